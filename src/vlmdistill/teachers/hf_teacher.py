"""Hugging Face ``CLIPModel`` teachers, from a hub id or a local directory."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

from vlmdistill.config import TeacherConfig
from vlmdistill.device import resolve_device
from vlmdistill.io import sha256_file, sha256_strings
from vlmdistill.teachers.base import Teacher, TeacherLoadError

_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _pooled(out: object) -> torch.Tensor:
    """``get_*_features`` returns a tensor in transformers 4 and may return a model output in 5."""
    if isinstance(out, torch.Tensor):
        return out
    return out.pooler_output  # type: ignore[attr-defined]


class HFClipTeacher(Teacher):
    def __init__(self, cfg: TeacherConfig) -> None:
        source = str(cfg.checkpoint) if cfg.checkpoint is not None else cfg.name
        try:
            model = CLIPModel.from_pretrained(source)
            tokenizer = AutoTokenizer.from_pretrained(source)
        except Exception as err:
            raise TeacherLoadError(
                f"could not load Hugging Face CLIPModel {source!r}: {err}. Give a local directory "
                "(save_pretrained) or a hub id that is already in the local cache"
            ) from err
        super().__init__(model, resolve_device(cfg.device), cfg.precision, cfg.batch_size)
        try:
            processor = CLIPImageProcessor.from_pretrained(source)
            mean, std = tuple(processor.image_mean), tuple(processor.image_std)
        except Exception:
            mean, std = _CLIP_MEAN, _CLIP_STD
        self.tokenizer = tokenizer
        self.image_size = int(model.config.vision_config.image_size)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.context_length = int(model.config.text_config.max_position_embeddings)
        self.embed_dim = int(model.config.projection_dim)
        self.id = "hf:" + sha256_strings(
            [source, self._revision(model, source), str(self.image_size), repr(self.mean), repr(self.std)]
        )[:20]
        self.description = f"hf {source}"

    @staticmethod
    def _revision(model: CLIPModel, source: str) -> str:
        """The hub commit when known, else a digest of the local weight files."""
        commit = getattr(model.config, "_commit_hash", None)
        if commit:
            return f"commit:{commit}"
        files = sorted(Path(source).glob("*.safetensors")) + sorted(Path(source).glob("*.bin"))
        if not files:
            raise TeacherLoadError(f"{source} has no weight files (*.safetensors or *.bin)")
        return "sha256:" + sha256_strings([sha256_file(f) for f in files])

    def _encode_images(self, x: torch.Tensor) -> torch.Tensor:
        return _pooled(self.model.get_image_features(pixel_values=x))

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(
            texts, padding="max_length", truncation=True, max_length=self.context_length, return_tensors="pt"
        )["input_ids"]

    def _encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return _pooled(self.model.get_text_features(input_ids=tokens, attention_mask=self._mask(tokens)))

    def _mask(self, tokens: torch.Tensor) -> torch.Tensor:
        """Real tokens up to and including the first end token (CLIP pads with its end token)."""
        end = self.tokenizer.eos_token_id
        if self.tokenizer.pad_token_id != end:
            return (tokens != self.tokenizer.pad_token_id).long()
        first_end = (tokens == end).int().argmax(dim=1, keepdim=True)
        return (torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0) <= first_end).long()

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text)["input_ids"])
