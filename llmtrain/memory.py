"""`python -m llmtrain.memory <the same overrides as a run>`: a run's peak memory, estimated before running it.

Parameters, gradients and optimizer state are counted from the model. Activations are measured: one forward pass
of a real batch at two small batch sizes, summing the tensors autograd keeps for the backward pass (a straight line
in the batch size), plus twice the largest of them for the gradients the backward pass holds at its start (the
logits' gradient, for a dense head), scaled by a measured factor. The process itself (Python and its libraries) and the data are measured too:
this command imports and loads what a run does. The largest batch size that fits the free RAM follows.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass

import psutil
import torch

MB = 2**20
HEADROOM = 0.9  # of the free RAM, for what the estimate leaves out (the OS, other processes' growth)
# Peak RSS of a forward + backward step over the bytes autograd saves, measured on DistilBERT and GPT-2 (4 x 256,
# 6 x 768; vocab 4k-16k): 1.15-1.3x, from the backward pass's gradients of activations and the allocator's slack.
BACKWARD_FACTOR = 1.2


@dataclass
class Estimate:
    """Bytes of each part of a run's peak memory, and the batch sizes they imply."""

    process: int  # the interpreter and its libraries, measured
    data: int  # tokenizer and packed blocks, measured
    parameters: int
    gradients: int
    optimizer: int
    activations: int  # at the run's batch size, transient backward gradients included
    per_example: int  # activations added by one more example in the batch
    batch_size: int
    available: int  # free RAM now
    largest_batch: int  # the largest micro-batch that fits the free RAM

    @property
    def total(self) -> int:
        return self.process + self.data + self.parameters + self.gradients + self.optimizer + self.activations

    def table(self) -> str:
        rows = [("process (Python, torch, transformers)", self.process), ("data (tokenizer, blocks)", self.data),
                ("parameters", self.parameters), ("gradients", self.gradients), ("optimizer state", self.optimizer),
                (f"activations (batch {self.batch_size})", self.activations), ("peak, estimated", self.total)]
        out = [f"{name:<40} {b / MB:>10.0f} MB" for name, b in rows]
        out += [f"{'free RAM now':<40} {self.available / MB:>10.0f} MB",
                f"largest trainer.batch_size that fits: {self.largest_batch} "
                f"(each example adds {self.per_example / MB:.1f} MB of activations)"]
        return "\n".join(out)


def saved_activations(model: torch.nn.Module, batch: dict[str, torch.Tensor], task: str, autocast) -> tuple[int, int]:
    """(bytes autograd saves for backward in one forward pass of loss_terms, bytes of the largest such tensor).

    Storages are counted once however many views of them are saved; parameters are not activations.
    """
    from llmtrain.training.losses import loss_terms, model_inputs

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params and t.device.type != "meta":
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast():
        loss_terms(model, model_inputs(batch), task)
    return sum(seen.values()), max(seen.values(), default=0)


def optimizer_slots(target: str) -> int:
    """State tensors per parameter: AdamW keeps two moments, SGD with momentum one."""
    return 2 if target.endswith("adamw") else 1


def estimate(cfg, process_bytes: int) -> Estimate:
    """Estimate the peak memory of `python -m llmtrain.run` with this composed config (builds data and model)."""
    from hydra.utils import instantiate

    from llmtrain.config import validate

    validate(cfg)
    hardware = instantiate(cfg.hardware)
    hardware.setup(cfg.seed)
    rss = psutil.Process().memory_info().rss
    data = instantiate(cfg.data, _convert_="all")
    data.setup()
    data_bytes = max(0, psutil.Process().memory_info().rss - rss)
    model = instantiate(cfg.model, _convert_="all").build(data.tokenizer, data.id2label).to(hardware.torch_device)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    # two probe sizes give the line activations(b) = fixed + per_example * b
    probe = next(iter(data.train_batches(4, 0)))
    points = []
    for b in (2, 4):
        saved, largest = saved_activations(model, {k: v[:b] for k, v in probe.items()}, data.task, hardware.autocast)
        points.append(BACKWARD_FACTOR * saved + 2 * largest)
    per_example = max(0, int(points[1] - points[0]) // 2)
    fixed = max(0, int(points[0]) - 2 * per_example)
    if hardware.autocast_dtype is not None:  # autocast keeps a low-precision copy of the weights during forward
        fixed += params // 2
    bs = int(cfg.trainer.batch_size)
    available = psutil.virtual_memory().available + psutil.Process().memory_info().rss  # this process will exit
    static = process_bytes + data_bytes + params + trainable * (1 + optimizer_slots(cfg.optimizer._target_)) + fixed
    largest = int((HEADROOM * available - static) // per_example) if per_example else bs
    return Estimate(process=process_bytes, data=data_bytes, parameters=params, gradients=trainable,
                    optimizer=trainable * optimizer_slots(cfg.optimizer._target_), activations=fixed + per_example * bs,
                    per_example=per_example, batch_size=bs, available=available, largest_batch=max(0, largest))


def main(argv: list[str]) -> None:
    import llmtrain.run  # noqa: F401 - import what a run imports, so that this process measures as one does

    process_bytes = psutil.Process().memory_info().rss
    from hydra import compose, initialize_config_dir

    from llmtrain.config import CONF
    from llmtrain.errors import UserError
    from llmtrain.runtime.hardware import quiet_libraries

    as_json = "--json" in argv
    overrides = [a for a in argv if a != "--json"]
    quiet_libraries()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    try:
        est = estimate(cfg, process_bytes)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if as_json:
        print(json.dumps({**asdict(est), "total": est.total}))
    else:
        print(est.table())
        if est.largest_batch == 0:
            print("the run does not fit even at trainer.batch_size=1: choose a smaller model (model.config) or "
                  "data.max_length, or free memory")
        elif est.largest_batch < est.batch_size:
            print(f"the run does not fit: lower trainer.batch_size to {est.largest_batch} or below and raise "
                  f"trainer.grad_accum_steps x{math.ceil(est.batch_size / est.largest_batch)} to keep the batch")


if __name__ == "__main__":
    main(sys.argv[1:])
