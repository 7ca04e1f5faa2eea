"""open_clip teachers: a model name + pretrained tag, a local checkpoint, or a custom model-config JSON."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import open_clip
import torch
from open_clip.hf_model import HFTextEncoder

from vlmdistill.config import TeacherConfig
from vlmdistill.device import resolve_device
from vlmdistill.io import sha256_file, sha256_strings
from vlmdistill.teachers.base import Teacher, TeacherLoadError


def _state_digest(model: torch.nn.Module) -> str:
    """Random weights are identified by their values, so two random teachers never share a cache."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class OpenClipTeacher(Teacher):
    def __init__(self, config: TeacherConfig) -> None:
        name = config.name
        config_digest = ""
        if config.model_config_path is not None:
            path = Path(config.model_config_path)
            if not path.is_file():
                raise TeacherLoadError(f"teacher.model_config {path} does not exist")
            try:
                json.loads(path.read_text())
            except json.JSONDecodeError as err:
                raise TeacherLoadError(f"teacher.model_config {path} is not valid JSON: {err}") from err
            open_clip.add_model_config(path)
            name = path.stem
            config_digest = sha256_file(path)[:16]
        if name not in open_clip.list_models():
            raise TeacherLoadError(
                f"open_clip has no model {name!r}; see open_clip.list_models() or give teacher.model_config"
            )
        pretrained, weights = self._weights(config)
        device = resolve_device(config.device)
        try:
            model = open_clip.create_model(name, pretrained=pretrained, device="cpu")
        except Exception as err:
            raise TeacherLoadError(
                f"could not load open_clip {name!r} with weights {pretrained!r}: {err}. "
                "Without network access the weights must already be in the Hugging Face cache "
                "(run once online), or point teacher.checkpoint at a local file"
            ) from err
        super().__init__(model, device, config.precision, config.batch_size)
        self.model_name = name
        self.model_cfg: dict = open_clip.get_model_config(name)
        pre = open_clip.get_model_preprocess_cfg(self.model)
        size = pre.get("size", 224)
        self.image_size = int(size if isinstance(size, int) else size[0])
        self.mean = tuple(float(v) for v in pre.get("mean", open_clip.OPENAI_DATASET_MEAN))
        self.std = tuple(float(v) for v in pre.get("std", open_clip.OPENAI_DATASET_STD))
        self.tokenizer = open_clip.get_tokenizer(name)
        self.context_length = int(getattr(self.tokenizer, "context_length", 77))
        with torch.no_grad():
            probe = self.tokenizer(["a"])
            self.embed_dim = int(model.encode_text(probe.to("cpu") if hasattr(probe, "to") else probe).shape[-1])
        self.model.to(device)
        if weights == "random":
            weights = "random:" + _state_digest(model)
        self.id = "open_clip:" + sha256_strings(
            [name, weights, config_digest, str(self.image_size), repr(self.mean), repr(self.std)]
        )[:20]
        self.description = f"open_clip {name} ({weights})"

    @staticmethod
    def _weights(config: TeacherConfig) -> tuple[str | None, str]:
        """What open_clip loads, and the string that identifies those weights in cache keys."""
        if config.checkpoint is not None:
            path = Path(config.checkpoint)
            if not path.is_file():
                raise TeacherLoadError(f"teacher.checkpoint {path} does not exist")
            return str(path), "sha256:" + sha256_file(path)
        if config.pretrained in (None, "", "random"):
            if config.pretrained != "random":
                raise TeacherLoadError(
                    "the teacher has no weights: set teacher.pretrained (e.g. openai) or teacher.checkpoint; "
                    "teacher.pretrained=random builds random weights, for tests only"
                )
            return None, "random"
        return config.pretrained, f"tag:{config.pretrained}"

    def _encode_images(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(x)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts)

    def _encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(self._unpadded(tokens))

    def _unpadded(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` without the trailing columns that are padding in every row, for a Hugging Face text tower:
        it masks its padding, so they change nothing, and dropping them makes short prompts (a learned prompt's
        every step) several times cheaper. open_clip's own tower adds a fixed-length positional embedding, so
        its tokens stay as they are."""
        text = getattr(self.model, "text", None)
        if not isinstance(text, HFTextEncoder):
            return tokens
        used = (tokens != text.config.pad_token_id).any(0).nonzero()
        return tokens[:, : int(used.max()) + 1] if len(used) else tokens

    def count_tokens(self, text: str) -> int:
        inner = getattr(self.tokenizer, "encode", None)
        if inner is None:
            return int((self.tokenizer([text])[0] != 0).sum())
        return len(inner(text)) + 2
