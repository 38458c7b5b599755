"""OSFT under FSDP2: two gloo processes, each holding and projecting only its rows of every
matrix, give the projections and the training of one process.

This file is also the script the tests launch with ``torch.distributed.run``:
``python tests/test_osft_fsdp.py {projection,train} OUT``.
"""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

# tests/ is on sys.path under pytest (prepend import mode) and when this file runs as a script.
from test_osft import spaced_weight
from transformers import LlamaForCausalLM, TrainerControl, TrainerState

from forgetless.errors import ForgetlessError
from forgetless.models import load_model
from forgetless.train.config import OsftConfig
from forgetless.train.osft import (
    OsftCallback,
    SubspaceBasis,
    projection_communication,
)

PROJECTIONS = ("two_sided", "top_block")
# Odd row counts (split 7 + 6 and 11 + 10 over two processes) with every storage of the factors:
# a left complement needs a square U (m = min(m, n)), as in (13, 13) and (13, 21).
SHAPES = [(13, 13), (21, 13), (13, 21), (12, 12)]
RANKS = (2, 7, 10)
STEPS = 3
# Per projection: how often the drift is re-projected (2: also once in the middle of the run),
# and whether the callback is built from the model already sharded (fully_shard first) or, as
# when accelerate shards the model inside Trainer.train, from the whole model sharded later.
REPROJECT_EVERY = {"two_sided": 2, "top_block": 8}
SHARDED_FIRST = {"two_sided": True, "top_block": False}


def projection_case(shape, rank, projection):
    weight = spaced_weight(shape)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    return weight, x, SubspaceBasis(weight, rank, projection)


def model_with_odd_rows() -> LlamaForCausalLM:
    """tiny-llama with an MLP width of 99: gate_proj and up_proj have 99 rows (50 + 49)."""
    config = copy.deepcopy(load_model("tiny-llama").model.config)
    config.intermediate_size = 99
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return LlamaForCausalLM(config)


def data():
    """Calibration batches and, per step, a global batch of 4 unpadded 32-token sequences."""
    generator = torch.Generator().manual_seed(2)
    calibration = [{"input_ids": torch.randint(0, 256, (1, 32), generator=generator)}] * 4
    batches = torch.randint(0, 256, (STEPS, 4, 32), generator=generator)
    return calibration, batches


def train(model, projection, batches, world=1, rank=0, shard=None):
    """STEPS optimizer steps driving OsftCallback's hooks the way the Trainer calls them; each
    process trains on its share of every global batch (equal token counts, so FSDP's averaged
    gradient is the one-process gradient of the whole batch). ``shard`` applies FSDP2."""
    calibration, _ = data()
    config = OsftConfig(
        projection=projection,
        project_gradients=True,
        reproject_every=REPROJECT_EVERY[projection],
    )
    if shard and SHARDED_FIRST[projection]:
        shard(model)
    callback = OsftCallback(model, config, calibration, verbose=False)
    if shard and not SHARDED_FIRST[projection]:
        shard(model)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.1
    )
    args = SimpleNamespace(deepspeed=None, fsdp=None)
    state, control = TrainerState(), TrainerControl()
    callback.on_train_begin(args, state, control, model=model)
    share = batches.shape[1] // world
    for step in range(1, STEPS + 1):
        batch = batches[step - 1, rank * share : (rank + 1) * share]
        model(input_ids=batch, labels=batch).loss.backward()
        callback.on_pre_optimizer_step(args, state, control)
        optimizer.step()
        callback.on_optimizer_step(args, state, control)
        optimizer.zero_grad(set_to_none=True)
        state.global_step = step
        control.should_training_stop = step == STEPS
        callback.on_step_end(args, state, control)
    callback.on_train_end(args, state, control)
    return callback


# ---- the two processes (run by torch.distributed.run) ----


def worker_projection(out: Path) -> None:
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    from forgetless.train.osft.sharding import row_block

    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (2,))
    reduced: list[int] = []
    all_reduce = torch.distributed.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        reduced.append(tensor.numel())
        return all_reduce(tensor, *args, **kwargs)

    torch.distributed.all_reduce = counting_all_reduce
    results: dict = {"cases": {}}
    for shape in SHAPES:
        for rank in RANKS:
            for projection in PROJECTIONS:
                weight, x, basis = projection_case(shape, rank, projection)
                sharded = distribute_tensor(weight, mesh, [Shard(0)])
                start, rows, group = row_block("w", sharded)
                local_shape, offset = compute_local_shape_and_global_offset(
                    sharded.shape, mesh, sharded.placements
                )
                assert (rows, start) == (local_shape[0], offset[0])
                basis.shard_rows_(start, rows, group)
                local = x[start : start + rows].clone()
                reduced.clear()
                basis.project_(local)
                results["cases"][shape, rank, projection] = {
                    "start": start,
                    "rows": local,
                    "left_rows": basis.left.shape[0],
                    "reduced": list(reduced),
                }
    try:  # sharded by columns: refused in one line
        row_block("w", distribute_tensor(spaced_weight((12, 12)), mesh, [Shard(1)]))
    except ForgetlessError as err:
        results["columns"] = str(err)
    torch.save(results, out / f"projection{torch.distributed.get_rank()}.pt")


def worker_train(out: Path) -> None:
    from torch.distributed.fsdp import fully_shard

    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (2,))
    rank = torch.distributed.get_rank()

    def shard(model):
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)

    saved = {}
    for projection in PROJECTIONS:
        model = model_with_odd_rows()
        callback = train(model, projection, data()[1], world=2, rank=rank, shard=shard)
        local = {
            name: (basis.rows, tuple(basis.left.shape), tuple(basis.right.shape))
            for name, basis in callback.projector.bases.items()
        }
        weights = {name: p.detach().full_tensor() for name, p in model.named_parameters()}
        saved[projection] = {"weights": weights, "ranks": callback.ranks, "local": local}
    # FSDP1 is refused, here when it wraps the model after the callback was built (as
    # accelerate would) and its parameters are flattened views.
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = model_with_odd_rows()
    callback = OsftCallback(model, OsftConfig(rank_policy="fixed"), verbose=False)
    wrapped = FullyShardedDataParallel(model, device_id=torch.device("cpu"), use_orig_params=True)
    for context in ({"model": wrapped}, {}):
        try:
            callback.on_train_begin(None, TrainerState(), TrainerControl(), **context)
        except ForgetlessError as err:
            saved.setdefault("fsdp1", []).append(str(err))
    torch.save(saved, out / f"train{rank}.pt")


def main(mode: str, out: str) -> None:
    torch.distributed.init_process_group("gloo")
    try:
        {"projection": worker_projection, "train": worker_train}[mode](Path(out))
    finally:
        torch.distributed.destroy_process_group()


# ---- the tests ----


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def two_processes(mode: str, out: Path) -> list[dict]:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        __file__, mode, str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(out / f"{mode}{rank}.pt", weights_only=False) for rank in (0, 1)]


@pytest.mark.skipif(sys.platform == "win32", reason="gloo processes via torchrun")
def test_row_sharded_projection_equals_the_whole_matrix_projection(tmp_path):
    ranks = two_processes("projection", tmp_path)
    stored = {projection: set() for projection in PROJECTIONS}
    for (shape, rank, projection), first in ranks[0]["cases"].items():
        second = ranks[1]["cases"][shape, rank, projection]
        weight, x, basis = projection_case(shape, rank, projection)
        stored[projection].add((basis.left_low, basis.right_low))
        whole = x.clone()
        basis.project_(whole)
        # Each process holds and projects its rows only (7 + 6 of 13, ...), with its rows of
        # the left factor; together they are the one-process projection.
        assert first["start"] == 0 and second["start"] == first["rows"].shape[0]
        assert first["rows"].shape[0] == -(-shape[0] // 2)
        assert [first["left_rows"], second["left_rows"]] == [
            len(first["rows"]),
            len(second["rows"]),
        ]
        joined = torch.cat([first["rows"], second["rows"]])
        torch.testing.assert_close(joined, whole, atol=1e-5, rtol=0)
        # One all-reduce per projection, of the size the docs give, against an all-gather of
        # the m x n matrix (a ring all-reduce of s elements moves 2 s per process).
        size = projection_communication(shape, rank, projection, basis.left_low, basis.right_low)
        assert first["reduced"] == second["reduced"] == [size]
        assert size < shape[0] * shape[1]
    # The cases cover every storage (high factor or its complement, on each side).
    assert all(len(combinations) == 4 for combinations in stored.values())
    assert "not (Shard(dim=1),)" in ranks[0]["columns"] and "\n" not in ranks[0]["columns"]


@pytest.mark.skipif(sys.platform == "win32", reason="gloo processes via torchrun")
def test_fsdp2_training_stays_in_the_allowed_subspace_and_matches_one_process(tmp_path):
    ranks = two_processes("train", tmp_path)
    _, batches = data()
    initial = dict(model_with_odd_rows().named_parameters())
    assert len(ranks[0]["fsdp1"]) == 2
    assert "does not support FSDP1" in ranks[0]["fsdp1"][0]
    assert "fsdp_version: 2" in ranks[0]["fsdp1"][0]
    assert "only DDP and FSDP2 are supported" in ranks[0]["fsdp1"][1]
    for projection in PROJECTIONS:
        fsdp = ranks[0][projection]
        assert ranks[1][projection]["weights"].keys() == fsdp["weights"].keys()
        single = model_with_odd_rows()
        callback = train(single, projection, batches)
        assert fsdp["ranks"] == callback.ranks  # the same importance, hence the same ranks
        trained = 0
        for name, param in single.named_parameters():
            start, end = initial[name].detach(), fsdp["weights"][name]
            drift = end - start
            if name.removesuffix(".weight") not in callback.projector.bases:
                # frozen outside the OSFT targets
                assert torch.equal(end, start) and torch.equal(param.detach(), start), name
                continue
            trained += 1
            basis = SubspaceBasis(
                start, callback.projector.bases[name.removesuffix(".weight")].rank, projection
            )
            assert max(basis.high_energy(drift)) < 1e-5 * float(drift.norm()), name
            gap = (end - param.detach()).norm() / (param.detach() - start).norm()
            assert gap < 1e-4, (name, float(gap))
        assert trained == 14
        # Each process kept only its rows of every left factor (50 + 49 of gate/up's 99) and
        # the whole right factor.
        for name, (rows, left, right) in fsdp["local"].items():
            other_rows, other_left, other_right = ranks[1][projection]["local"][name]
            m, n = initial[name + ".weight"].shape
            assert rows == (0, -(-m // 2)) and other_rows == (rows[1], m - rows[1])
            assert (left[0], other_left[0]) == (rows[1], other_rows[1]) and right[0] == n
            assert left[1] == other_left[1] and right == other_right


if __name__ == "__main__":
    main(*sys.argv[1:])
