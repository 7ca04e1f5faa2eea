"""Inference latency of a deployed student (PyTorch and ONNX Runtime) against the teacher's image tower.

The student is the paper's: torchvision ResNet18 projecting to ViT-L/14's 768-d space, as ``vlmdistill
export`` writes it (normalisation + projection + cosine head over 200 classes, CUB's count). The teacher
is the paper's ViT-L/14 image tower (open_clip, random weights) at the same 224 px. Figures: ms/image at
batch 1 (median of repeats) and images/s at batch 64, then teacher/student ratios. Runs on CUDA when one is
present (unless ``--device`` is given) and says so when it runs without one; ONNX Runtime runs on the CPU
execution provider (the installed onnxruntime is the CPU build).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from _common import TINY_VIT, parse_args, print_table, setup, sync, write_results

from vlmdistill.config import StudentConfig
from vlmdistill.export import ONNX_OPSET, OnnxHead
from vlmdistill.students import count_parameters, create_student

FULL = {"student": "tv:resnet18", "teacher": "ViT-L-14", "size": 224, "dim": 768, "classes": 200}
QUICK = {"student": "resnet10t", "teacher": "bench-tiny-vit", "size": 96, "dim": 128, "classes": 20}


def interleaved(arms: dict[str, Callable[[], object]], calls: dict[str, int], rounds: int,
                device: torch.device) -> dict[str, float]:
    """Median seconds per call of each arm after one warm-up call. The arms take turns round by round, so a
    change in the machine's load hits all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in arms}
    for fn in arms.values():
        fn()
    for _ in range(rounds):
        for name, fn in arms.items():
            for _ in range(calls[name]):
                sync(device)
                start = time.perf_counter()
                fn()
                sync(device)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def teacher_tower(name: str, device: torch.device, work: Path) -> torch.nn.Module:
    import open_clip

    if name == QUICK["teacher"]:
        path = work / f"{name}.json"
        path.write_text(json.dumps(TINY_VIT))
        open_clip.add_model_config(path)
    return open_clip.create_model(name, pretrained=None).visual.eval().to(device)


def onnx_session(head: torch.nn.Module, size: int, work: Path, threads: int) -> object:
    import onnxruntime as ort

    path = work / "student.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(head.cpu(), (torch.rand(1, 3, size, size),), str(path), dynamo=False,
                          opset_version=ONNX_OPSET, input_names=["pixels"], output_names=["embedding", "logits"],
                          dynamic_axes={"pixels": {0: "batch"}})
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def measure(sizes: dict, device: torch.device, args: object, work: Path) -> dict[str, dict[str, float]]:
    """ms/image at batch 1 and images/s at batch 64 for each arm."""
    s, quick = sizes["size"], args.quick
    student = create_student(StudentConfig(arch=sizes["student"], image_size=s), sizes["dim"])
    head = OnnxHead(student, torch.nn.functional.normalize(torch.randn(sizes["classes"], sizes["dim"]), dim=-1),
                    1 / 0.07).eval()
    session = onnx_session(head, s, work, args.threads)
    head.to(device)
    teacher = teacher_tower(sizes["teacher"], device, work)
    arms: dict[str, Callable[[torch.Tensor], object]] = {
        "student_pytorch": head,
        "student_onnxruntime": lambda x: session.run(None, {"pixels": x.cpu().numpy()}),
        "teacher_pytorch": teacher,
    }
    slow = not quick and device.type == "cpu"
    calls = {name: 1 if slow and name.startswith("teacher") else 5 for name in arms}
    out: dict[str, dict[str, float]] = {name: {} for name in arms}
    for batch, rounds in ((1, 5), (64, 2 if slow else 3)):
        x = torch.rand(batch, 3, s, s, device=device)
        with torch.inference_mode():
            secs = interleaved({n: (lambda f=f, x=x: f(x)) for n, f in arms.items()},
                               calls if batch == 1 else dict.fromkeys(arms, 1), rounds, device)
        for name, t in secs.items():
            out[name]["ms_per_image_batch1" if batch == 1 else "images_per_s_batch64"] = 1000 * t if batch == 1 \
                else batch / t
    for name, v in out.items():
        print(f"  {name}: {v['ms_per_image_batch1']:.2f} ms/image at batch 1, "
              f"{v['images_per_s_batch64']:.1f} images/s at batch 64", flush=True)
    out["params"] = {"student": count_parameters(student), "teacher_image_tower": count_parameters(teacher)}
    return out


def main() -> None:
    args = parse_args(__doc__)
    if "--device" not in sys.argv and torch.cuda.is_available():
        args.device = "cuda"
    setup(args)
    device = torch.device(args.device)
    if device.type == "cpu":
        print("no GPU in use: timing on the CPU" + (" (none available)" if not torch.cuda.is_available() else ""))
    sizes = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory(prefix="vlmdistill-latency-") as tmp:
        res = measure(sizes, device, args, Path(tmp))
    st, so, te = res["student_pytorch"], res["student_onnxruntime"], res["teacher_pytorch"]
    ms, ips = "ms_per_image_batch1", "images_per_s_batch64"
    figures = {
        **res,
        "ratio_teacher_over_student_pytorch_batch1": te[ms] / st[ms],
        "ratio_teacher_over_student_onnxruntime_batch1": te[ms] / so[ms],
        "ratio_student_over_teacher_throughput_batch64_pytorch": st[ips] / te[ips],
        "ratio_student_over_teacher_throughput_batch64_onnxruntime": so[ips] / te[ips],
        "onnxruntime_speedup_over_pytorch_batch1": st[ms] / so[ms],
        "onnxruntime_speedup_over_pytorch_batch64": so[ips] / st[ips],
    }
    print_table(f"latency ({sizes['student']} vs {sizes['teacher']} image tower, {sizes['size']} px, {device})", [
        ("teacher/student ms, batch 1, PyTorch", f"{figures['ratio_teacher_over_student_pytorch_batch1']:.1f}x", ""),
        ("teacher/student ms, batch 1, ONNX Runtime",
         f"{figures['ratio_teacher_over_student_onnxruntime_batch1']:.1f}x", ""),
        ("student/teacher img/s, batch 64, PyTorch",
         f"{figures['ratio_student_over_teacher_throughput_batch64_pytorch']:.1f}x", ""),
        ("ONNX Runtime over PyTorch, student batch 1", f"{figures['onnxruntime_speedup_over_pytorch_batch1']:.2f}x",
         ">= 1"),
        ("ONNX Runtime over PyTorch, student batch 64", f"{figures['onnxruntime_speedup_over_pytorch_batch64']:.2f}x",
         ">= 1"),
    ])
    print(f"wrote {write_results('latency', args, {**sizes, 'device': str(device)}, figures)}")


if __name__ == "__main__":
    main()
