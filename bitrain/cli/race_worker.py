"""One engine of ``bitrain bench --inference``'s race, in a process of its own.

``python -m bitrain.cli.race_worker SPEC`` (SPEC: JSON from ``race.py``) loads one engine's model once and
answers the parent over stdin/stdout, one JSON line per command: ``prepare`` (build for a batch size, warm
up, time one batch, write the logits of the batch for the agreement check), ``time`` (run k batches, the
seconds), ``quit``. Between commands it blocks on stdin. Each runtime keeps its own way of waiting, as a
user runs it (libgomp's threads, torch's and numba's, spin briefly after work, then sleep; OpenVINO's TBB
workers likewise), except onnxruntime, whose spinning is off: waiting, it took 0.42 s of CPU from the
others per batch size of a run, libgomp's workers 0.08 s each. The parent reports that CPU.
Anything the libraries print goes to stderr (the parent's log file), never into the replies.

The models come from the parent's folder: ``binary.pt`` / ``float.pt`` (``model_args`` and a state dict:
the binary model and its float twin) and ``packed.safetensors`` (the binary model's packed export).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple


class Engine(NamedTuple):
    label: str  # what the row is
    group: str  # "binary": computes the binary network; "float": its float twin
    needs: str | None  # the optional package it imports


ENGINES: dict[str, Engine] = {
    "packed": Engine("bitrain packed engine (numba xnor-popcount)", "binary", None),
    "openvino-binary": Engine("OpenVINO, bitrain's IR: BinaryConvolution, float parts f32", "binary", "openvino"),
    "torch-latent": Engine("float-latent binary model, torch eager (the training-time model)", "binary", None),
    "torch-float": Engine("float twin, torch eager", "float", None),
    "onnxruntime-float": Engine("float twin, onnxruntime (its bitrain export --format onnx)", "float", "onnxruntime"),
    "openvino-float-f32": Engine("float twin, OpenVINO at f32", "float", "openvino"),
    "openvino-float": Engine("float twin, OpenVINO at its default precision", "float", "openvino"),
}

Run = Callable[[Any], Any]  # a float32 NCHW numpy batch -> logits (numpy)
Prepare = Callable[[int], Run]  # batch size -> run


def batch_input(seed: int, batch: int, shape) -> Any:
    """The batch every engine runs at this batch size (the same in each process)."""
    import numpy as np

    return np.random.default_rng(seed + batch).standard_normal((batch, *shape), dtype=np.float32)


def _rebuild(path: Path):
    import torch

    from bitrain.models import build_model

    saved = torch.load(path, weights_only=True)
    model = build_model(**saved["model_args"])
    model.load_state_dict(saved["state_dict"])
    return model.eval()


def _torch(model) -> Prepare:
    import torch

    def prepare(batch: int) -> Run:
        def run(x):
            with torch.inference_mode():
                return model(torch.from_numpy(x)).numpy()

        return run

    return prepare


def _openvino(graph, spec: dict, precision: str | None, info: dict) -> Prepare:
    """The graph compiled per batch size (BinaryConvolution takes static shapes); ``precision`` None: OpenVINO
    picks (``info['precision']``: what the compiled model reports)."""
    from bitrain.deploy.openvino import require_openvino

    core = require_openvino().Core()

    def prepare(batch: int) -> Run:
        g = graph.clone()
        g.reshape([batch, *spec["shape"]])
        config: dict[str, Any] = {"INFERENCE_NUM_THREADS": spec["threads"]}
        if precision is not None:
            config["INFERENCE_PRECISION_HINT"] = precision
        compiled = core.compile_model(g, "CPU", config)
        info["precision"] = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        info["performance_hint"] = str(compiled.get_property("PERFORMANCE_HINT"))
        info["cpu_pinning"] = bool(compiled.get_property("ENABLE_CPU_PINNING"))
        request = compiled.create_infer_request()

        def run(x):
            request.infer({0: x}, share_inputs=True)
            return request.get_output_tensor(0).data

        return run

    return prepare


def _onnxruntime(model, spec: dict, info: dict) -> Prepare:
    import onnxruntime as ort

    from bitrain.deploy.onnx_export import export_onnx

    path = Path(spec["dir"]) / "float.onnx"
    export_onnx(model, path, input_shape=(1, *spec["shape"]), model_args={})
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = spec["threads"], 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # its idle spin took others' CPU
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    info["onnx_bytes"] = path.stat().st_size
    return lambda batch: lambda x: session.run(None, {name: x})[0]


def load(spec: dict) -> tuple[Prepare, dict]:
    """(prepare, info) of the engine ``spec['engine']``; ImportError when its package is missing, UserError
    when its export refuses the model."""
    import importlib

    name, folder = spec["engine"], Path(spec["dir"])
    needs = ENGINES[name].needs
    if needs is not None:  # first: a missing package is skipped before torch is imported
        try:
            importlib.import_module(needs)
        except ImportError as e:
            raise ImportError(f"{needs} does not import ({e})") from None
    import torch

    from bitrain.deploy.memory import keep_freed_memory

    torch.set_num_threads(spec["threads"])
    system = "allocator: the system's, as it is (--allocator system)"
    info: dict[str, Any] = {"allocator": keep_freed_memory() if spec["allocator"] == "keep" else system}
    if name == "packed":
        from bitrain.deploy.load import load_packed
        from bitrain.deploy.packed import resolve_kernel
        from bitrain.models import build_model

        info["kernel"] = resolve_kernel(spec["kernel"])
        return _torch(load_packed(folder / "packed.safetensors", build_model, kernel=spec["kernel"])), info
    model = _rebuild(folder / ("float.pt" if ENGINES[name].group == "float" else "binary.pt"))
    if name in ("torch-latent", "torch-float"):
        from bitrain.deploy.swaps import channels_last_stem

        channels_last_stem(model)  # as bitrain runs a float model for inference (cli.reader; load_packed too)
        return _torch(model), info
    if name == "onnxruntime-float":
        return _onnxruntime(model, spec, info), info
    from bitrain.deploy.openvino import build_graph

    graph = build_graph(model, (1, *spec["shape"]))
    return _openvino(graph, spec, None if name == "openvino-float" else "f32", info), info


def _why(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__


class _Server:
    def __init__(self, spec: dict, prepare: Prepare, info: dict):
        self.spec, self.prepare, self.info = spec, prepare, info
        self.clock = time.process_time if spec["clock"] == "cpu" else time.perf_counter
        self.run: Run | None = None
        self.x = None

    def do_prepare(self, batch: int, warmup: int) -> dict:
        """Build for ``batch``, save the logits of its input (the first, untimed run), then ``warmup`` - 1
        more runs, each timed: the least of them is one batch's seconds."""
        import numpy as np

        self.run = self.prepare(batch)
        self.x = batch_input(self.spec["seed"], batch, self.spec["shape"])
        out = np.array(self.run(self.x), dtype=np.float32, copy=True)
        path = Path(self.spec["dir"]) / f"{self.spec['engine']}-{batch}.npy"
        np.save(path, out)
        seconds = [self.do_time(1)["seconds"] for _ in range(max(1, warmup - 1))]
        return {"seconds": min(seconds), "logits": str(path), "info": self.info}

    def do_time(self, k: int) -> dict:
        run, x, clock = self.run, self.x, self.clock
        t0 = clock()
        for _ in range(k):
            run(x)
        return {"seconds": clock() - t0}


def serve(spec: dict, reply: Callable[[dict], None]) -> None:
    """Load the engine, say so (or why not), then answer commands until ``quit`` or the end of stdin."""
    try:
        prepare, info = load(spec)
    except Exception as e:  # a missing package, an export that refuses the model: the engine is skipped
        reply({"ok": False, "error": _why(e)})
        return
    reply({"ok": True, "info": info, "pid": os.getpid()})
    server = _Server(spec, prepare, info)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "quit":
            return
        try:
            if cmd["cmd"] == "prepare":
                out = server.do_prepare(cmd["batch"], cmd["warmup"])
            else:
                out = server.do_time(cmd["k"])
            reply({"ok": True, **out})
        except Exception as e:
            reply({"ok": False, "error": _why(e)})


def batches_per_slice(seconds: float, slice_s: float) -> int:
    """How many batches an engine runs in its turn of a round: about ``slice_s``, at least one."""
    return max(1, min(10_000, math.ceil(slice_s / max(seconds, 1e-9))))


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    replies = os.fdopen(os.dup(1), "w", buffering=1)  # the pipe to the parent: replies only
    os.dup2(2, 1)  # what anything else prints (C libraries included) goes to the log
    sys.stdout = sys.stderr

    def reply(obj: dict) -> None:
        replies.write(json.dumps(obj) + "\n")
        replies.flush()

    serve(spec, reply)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
