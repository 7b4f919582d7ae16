"""One rank of the distributed tests: ``python worker.py SCENARIOS RANK WORLD DIR``.

Joins a gloo group through a file store in DIR (no port to pick), runs each scenario (comma-separated names of
`SCENARIOS`) in order and saves what it got to ``DIR/<scenario>.<rank>.pt``: the quantized model's state dict,
or the error's type name, message and ranks. `build` is also what the tests call for the one-process result.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

import postquant
import postquant.distributed
from postquant.errors import PostquantError
from postquant.model import quantized_layers
from postquant.reconstruct.params import LayerRounding
from postquant_lab.study import StudyRunner, StudySettings, get_axis, study_axis

_spec = importlib.util.spec_from_file_location("_pq_conftest", Path(__file__).parents[1] / "conftest.py")
_conftest = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
_spec.loader.exec_module(_conftest)  # type: ignore[union-attr]

LEARNED = {
    "w_bits": 3,
    "a_bits": 8,
    "calib_size": 40,
    "learned": {"iters": 40, "batch_size": 8, "progress": False},
}

SCENARIOS: dict[str, dict[str, Any]] = {
    "rtn": {"method": "rtn", "w_bits": 4, "a_bits": 8, "a_observer": "minmax"},
    "squant": {
        "method": "squant",
        "w_bits": 3,
        "a_bits": 4,
        "a_observer": "percentile",
        "a_percentile": 99.0,
    },
    "rtn_mse": {"method": "rtn", "w_bits": 4, "a_bits": 6, "a_observer": "mse", "w_range": "mse"},
    "squant_std": {"method": "squant", "w_bits": 4, "a_bits": 4, "a_observer": "std", "grid": "power"},
    "adaround": {**LEARNED, "method": "adaround"},  # data-parallel steps
    "brecq": {**LEARNED, "method": "brecq", "a_bits": 4},  # blocks, learned activation steps
    "qdrop": {**LEARNED, "method": "qdrop", "a_bits": 4},  # drop_prob > 0: each rank runs whole batches
    "gptq": {"method": "gptq", "w_bits": 3, "calib_size": 40},  # Hessians summed, one rank solves
}

# Mixed precision: the importance of 4 layers at 2, 4 and 8 bits on 40 samples (7 batches), an average of 4 bits.
MIXED = {"w_bits_budget": 4.0, "bit_choices": [2, 4, 8], "calib_size": 40}
for _importance in ("loss", "fisher", "taylor"):  # loss: layers split; fisher, taylor: batches split
    SCENARIOS[f"mixed_{_importance}"] = {
        "method": "rtn",
        "w_bits": 4,
        "a_bits": 8,
        "mixed": {**MIXED, "importance": _importance},
    }
SCENARIOS["mixed_squant_ckpt"] = {  # + mixed.checkpoint_dir: rank 0 alone writes the table
    "method": "squant",
    "w_bits": 4,
    "mixed": {**MIXED, "importance": "loss"},
}
SCENARIOS["mixed_resume"] = SCENARIOS["mixed_squant_ckpt"]  # resumes a table the test left half measured

# The block path (`quantize_blocks`) on a tiny random Llama: 7 calibration batches of 2 windows (shards of 4 and
# 3 batches), weight-only, lm_head kept float.
BLOCK_LEARNED = {"iters": 30, "batch_size": 4, "progress": False}
BLOCKS: dict[str, dict[str, Any]] = {
    "block_rtn": {"method": "rtn", "w_bits": 3},
    "block_squant": {"method": "squant", "w_bits": 3, "granularity": "group", "group_size": 16},
    "block_gptq": {"method": "gptq", "w_bits": 3, "granularity": "group", "group_size": 16},
    "block_learned": {"method": "learned", "w_bits": 3, "learned": BLOCK_LEARNED},
    "block_qdrop": {"method": "qdrop", "w_bits": 3, "learned": BLOCK_LEARNED},  # QDrop's draws on a shard
    "block_ckpt": {"method": "brecq", "w_bits": 3, "learned": BLOCK_LEARNED},  # + learned.checkpoint_dir
    "block_spill": {"method": "learned", "w_bits": 3, "learned": BLOCK_LEARNED},  # chains in mapped files
    "block_range": {  # learned ranges: each layer's multipliers trained by its owner, then broadcast
        "method": "learned-fast",
        "w_bits": 3,
        "granularity": "group",
        "group_size": 16,
        "learned": {"iters": 12, "batch_size": 4, "progress": False, "learn_weight_range": True},
    },
}


def build(
    scenario: str, rank: int = 0, out: Path | None = None
) -> tuple[torch.nn.Module, dict[str, Any], list[torch.Tensor]]:
    """The model, recipe and calibration batches of `scenario` as rank `rank` holds them (they differ from
    rank 0's only in the mismatch scenarios); `out`: where mixed_squant_ckpt and mixed_resume save their
    importance tables."""
    model = _conftest.make_tiny_cnn(seed=1 if scenario == "bad_model" and rank == 1 else 0)
    recipe = dict(SCENARIOS.get(scenario, SCENARIOS["rtn"]))
    if scenario in ("mixed_squant_ckpt", "mixed_resume") and out is not None:
        folder = "importance" if scenario == "mixed_squant_ckpt" else "resume"
        recipe["mixed"] = {**recipe["mixed"], "checkpoint_dir": str(out / folder)}
    if scenario == "bad_recipe" and rank == 1:
        recipe["w_bits"] = 3
    gen = torch.Generator().manual_seed(7)
    images = torch.randn(1 if scenario == "one_sample" else 40, 3, 12, 12, generator=gen)
    return model, recipe, list(torch.split(images, 6))  # 7 batches: shards of 4 and 3


@contextlib.contextmanager
def counting_weight_side() -> Iterator[list[int]]:
    """Counts (in the list's one item) the rounding variables whose soft weights this process computes for
    training: the weight side of learned rounding that each rank does for its own layers only."""
    count = [0]
    original = LayerRounding.weight

    def weight(self: LayerRounding) -> torch.Tensor:
        if torch.is_grad_enabled():
            count[0] += self.floor.numel()
        return original(self)

    LayerRounding.weight = weight  # type: ignore[method-assign]
    try:
        yield count
    finally:
        LayerRounding.weight = original  # type: ignore[method-assign]


def codes(qmodel: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The integer codes of every quantized layer (the state dict holds them packed)."""
    return {name: layer.codes.clone() for name, layer in quantized_layers(qmodel).items()}


def build_blocks(
    scenario: str, out: Path | None = None
) -> tuple[torch.nn.Module, dict[str, Any], list[torch.Tensor]]:
    """The tiny Llama, recipe and token batches of a block-path scenario (`out`: where block_ckpt checkpoints)."""
    recipe = {**BLOCKS[scenario], "ignore": ["lm_head"], "calib_size": 14}
    if scenario == "block_ckpt" and out is not None:
        recipe["learned"] = {**recipe["learned"], "checkpoint_dir": str(out / "ckpt")}
    ids = torch.randint(0, 64, (14, 16), generator=torch.Generator().manual_seed(3))
    return _conftest.make_tiny_llama(), recipe, list(ids.split(2))


# A tiny study: the selection axis's 2 variants x 2 seeds on the tiny ResNet (4 runs: 2 rounds on 2 ranks).
STUDY = StudySettings("tiny-resnet", "W4A4", iters=4, calib_size=32)
STUDY_LABELS = ["all", "random 0.5"]


def study(out: Path, data: Path) -> dict[str, Any]:
    """Run the tiny study with results in `out` (the zoo's files written to `data`): the records this process
    holds, the axis's verdict line, the runs missing, and per run quantized here the process group it saw."""
    data.mkdir(parents=True, exist_ok=True)
    zoo = _conftest.make_tiny_zoo(data)
    ran = []

    def quantize(*args: Any, **kwargs: Any) -> torch.nn.Module:
        ran.append(postquant.distributed.current())  # None: the run is alone on this rank
        return postquant.quantize(*args, **kwargs)

    runner = StudyRunner(out, loader=lambda name: zoo, quantize=quantize, progress=False)
    report = study_axis(STUDY, get_axis("selection"), [0, 1], runner, STUDY_LABELS)
    return {
        "records": runner.store.records,
        "summary": report.summary,
        "missing": report.missing,
        "failures": runner.failures,
        "ran": ran,
    }


def outcome(qmodel: torch.nn.Module, seconds: float) -> dict[str, Any]:
    """What a test compares: the state dict, the codes, the learned units' errors, the wall time."""
    learned, mixed = postquant.result(qmodel).learned, postquant.result(qmodel).mixed
    return {
        "state": {k: v.clone() for k, v in qmodel.state_dict().items()},
        "mixed": {row.name: (row.bits, row.costs) for row in mixed.layers} if mixed is not None else None,
        "codes": codes(qmodel),
        "learned": [(u.error_before, u.error_after) for u in learned.units] if learned is not None else None,
        "resumed": learned.resumed if learned is not None else 0,
        "seconds": seconds,
    }


def run(scenario: str, rank: int, out: Path | None = None) -> dict[str, Any]:
    if scenario == "study" and out is not None:
        return study(out / "study", out / f"zoo.{rank}")
    if scenario in BLOCKS:
        model, recipe, batches = build_blocks(scenario, out)
        kwargs: dict[str, Any] = {}
        if scenario == "block_spill" and out is not None:  # every chain a memory-mapped file
            kwargs = {"chain_bytes": 0, "spill_dir": out / f"spill.{rank}"}
        start = time.perf_counter()
        with counting_weight_side() as count:
            qmodel = postquant.quantize_blocks(model, recipe, batches, **kwargs)
        return {**outcome(qmodel, time.perf_counter() - start), "weight_side": count[0]}
    model, recipe, batches = build(scenario, rank, out)
    if scenario == "dead" and rank == 1:
        os._exit(3)  # a rank that dies before the first collective
    if scenario == "hung" and rank == 1:
        time.sleep(8)  # past the tests' 3 s timeout
    start = time.perf_counter()
    try:
        qmodel = postquant.quantize(model, recipe, calib=batches)
    except PostquantError as exc:
        return {
            "error": type(exc).__name__,
            "message": str(exc),
            "ranks": getattr(exc, "ranks", None),
            "seconds": time.perf_counter() - start,
        }
    return outcome(qmodel, time.perf_counter() - start)


def main() -> None:
    scenarios, rank, world, out = (
        sys.argv[1].split(","),
        int(sys.argv[2]),
        int(sys.argv[3]),
        Path(sys.argv[4]),
    )
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{out / 'store'}", rank=rank, world_size=world
    )
    for scenario in scenarios:
        torch.save(run(scenario, rank, out), out / f"{scenario}.{rank}.pt")
    if not {"dead", "hung"} & set(scenarios):
        # both ranks done before either tears the group down: a peer closing its connections while the other
        # is still in gloo makes gloo abort the process (SIGABRT, seen once in CI)
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
