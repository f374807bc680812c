"""Every stage under `torchrun --nproc_per_node=2` (gloo on this CPU) with each engine trains exactly as one process
on the same global batch; checkpoints move between world sizes; a dead or hung rank stops the job."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

# Short runs of the tiny preset: 2a on 4 images x 4 captions, stage 1 on 4 pairs, no report or final model. The
# decoder renders one image's captions per forward in both runs: batched fp32 GEMMs round differently per batch
# shape, and the tiny random decoder turns that into reward differences of ~1e-5 — as large as its groups' spread.
G4U = ["--preset", "tiny", "batch_size=16", "num_generations=4", "decoder.batch_size=4", "micro_batch_tokens=64",
       "report_images=0", "save_final_model=false", "tensorboard=false"]  # fmt: skip
U4G = ["--preset", "tiny", "--stage", "u4g", "u4g.batch_size=16", "u4g.num_generations=4", "decoder.batch_size=4",
       "u4g.beta=0.05", "report_images=0", "save_final_model=false", "tensorboard=false"]  # fmt: skip
UNIFIED = [*G4U[:2], "--stage", "unified", *G4U[2:], "u4g.batch_size=16", "u4g.num_generations=4",
           "unified.g4u_steps=1"]  # fmt: skip
COLD_START = ["--preset", "tiny", "--stage", "cold_start", "cold_start.captions=greedy", "decoder.batch_size=2",
              "cold_start.eval_images=0", "report_images=0", "save_final_model=false", "tensorboard=false"]  # fmt: skip
PRETRAIN = ["--preset", "tiny", "--stage", "pretrain", "pretrain.eval_images=0", "pretrain.ema_decay=0.9",
            "report_images=0", "save_final_model=false", "tensorboard=false"]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(out: Path, args: list[str], processes: int, launcher: str = "torchrun") -> list[str]:
    cli = ["-m", "uae_fast.cli", "train", "--out", str(out), *args]
    if processes == 1:
        return [sys.executable, *cli]
    if launcher == "deepspeed":  # `deepspeed --num_gpus N --module uae_fast.cli ...` (it uses CPU ranks here)
        run = ["-m", "deepspeed.launcher.runner", f"--num_gpus={processes}", f"--master_port={free_port()}"]
        return [sys.executable, *run, "--module", *cli[1:]]
    run = ["-m", "torch.distributed.run", f"--nproc_per_node={processes}", f"--master_port={free_port()}"]
    return [sys.executable, *run, *cli]


def launch_options(out: Path) -> dict:
    """Popen options of a launch: one thread per process, and run from the run's parent folder — from the repo root,
    `-m uae_fast.cli` would import the source tree instead of the installed package (no compiled parts)."""
    return {"env": {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}, "cwd": str(Path(out).parent)}


@pytest.fixture
def launch():
    """`launch(out, args, processes)`: `uae-fast train` in `processes` processes (torchrun when > 1); returns the
    finished process (stdout + stderr in `.stdout`) and fails the test on a non-zero exit."""

    def run(
        out: Path, args: list[str], processes: int = 2, timeout: float = 300, launcher: str = "torchrun"
    ) -> subprocess.CompletedProcess:
        done = subprocess.run(
            launch_command(out, args, processes, launcher),
            **launch_options(out),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
        )
        assert done.returncode == 0, done.stdout[-4000:]
        return done

    return run


def checkpoint_tensors(run_dir: Path, step: int | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Every safetensors file of a run's checkpoint (the latest, or `step`'s) by relative path, RNG states left out."""
    found = sorted(run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    folder = run_dir / f"checkpoint-{step}" if step is not None else found[-1]
    out = {}
    for path in sorted(folder.rglob("*.safetensors")):
        tensors = load_file(path)
        out[str(path.relative_to(folder))] = {k: v for k, v in tensors.items() if not k.startswith("rng.")}
    return out


def assert_same_training(a: dict, b: dict, *, lr: float, steps: int, moment_rtol: float = 1e-4) -> None:
    """Two checkpoints hold the same training: the same files and tensors; Adam's moments — the averaged gradients:
    a gradient not reduced, or reduced at a wrong scale, shows here — equal to `moment_rtol` of each tensor's largest
    entry; 99.9 % of the weights within 1 % of Adam's largest possible update (lr per step), all within twice it:
    where a gradient is ~0, Adam's g/(√v + ε) turns rounding noise (the summation order differs between 1 and 2
    processes) into a step of up to ±lr."""
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys(), name
        close = total = 0
        for key, x in a[name].items():
            y = b[name][key]
            assert x.shape == y.shape, (name, key)
            if not x.numel():
                continue
            diff = (x.double() - y.double()).abs()
            if name == "optimizer.safetensors":
                scale = float(x.double().abs().max())
                assert float(diff.max()) <= moment_rtol * scale + 1e-12, (name, key, float(diff.max()), scale)
            else:
                assert float(diff.max()) <= 2 * lr * steps, (name, key, float(diff.max()))
                close, total = close + int((diff <= 0.01 * lr * steps).sum()), total + diff.numel()
        assert close >= 0.999 * total, (name, total - close, total)


G4U_LR, PRETRAIN_LR, U4G_LR = 2e-3, 3e-3, 0.1  # the shipped tiny configs' learning rates


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """One-process runs, made once: stage 2a for 3 steps (a checkpoint each), stage 1 for 4 (checkpoints at 2, 4),
    stage 2b for 1, the unified schedule for 2 (a 2a step, then a 2b step), the cold start for 1."""
    runs = {
        "g4u": [*G4U, "max_steps=3", "save_steps=1", "save_total_limit=3"],
        "pretrain": [*PRETRAIN, "max_steps=4", "save_steps=2"],
        "u4g": [*U4G, "max_steps=1"],
        "unified": [*UNIFIED, "max_steps=2"],
        "cold_start": [*COLD_START, "max_steps=1"],
    }
    root = tmp_path_factory.mktemp("one")
    # One thread each: started together, they share the cores instead of waiting for each other's start-up.
    jobs = {
        name: subprocess.Popen(
            launch_command(root / name, args, 1), **launch_options(root / name), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True,
        )
        for name, args in runs.items()
    }  # fmt: skip
    for name, job in jobs.items():
        output, _ = job.communicate(timeout=600)
        assert job.returncode == 0, f"{name}: {output[-4000:]}"
    return {name: root / name for name in runs}


# fsdp2: the unified schedule's 2a step below; zero2: test_g4u_resumes_on_two_processes_from_one
def test_g4u_on_two_nodes_trains_as_one(tmp_path, one_process):
    """Two nodes of one process each (two `torchrun --nnodes=2` on this machine, as on two hosts): every rank has
    LOCAL_RANK 0, so anything keyed on the local rank instead of the global one (who writes, which images a rank
    draws) shows here. One step from the same rollouts under ddp equals one process's (the ranks sample what one
    process samples for their images). Further steps are not compared: rollouts sampled from weights that differ by
    rounding drift apart (as they do in one process under another micro-batching)."""
    out, port = tmp_path / "run", free_port()
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", f"--node_rank={node}",
             "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "uae_fast.cli", "train", "--out", str(out),
             *G4U, "max_steps=1", "distributed.engine=ddp"],
            **launch_options(out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for node in (0, 1)
    ]  # fmt: skip
    for node in nodes:
        output, _ = node.communicate(timeout=300)
        assert node.returncode == 0, output[-4000:]
    a, b = checkpoint_tensors(one_process["g4u"], 1), checkpoint_tensors(out)
    assert_same_training(a, b, lr=G4U_LR, steps=1)


def _frozen_model(uae, stage: str):
    """The model a stage keeps frozen (the name the job log gives it) and its repeated blocks."""
    if stage == "g4u":
        dit = uae.decoder.transformer
        return "the frozen DiT", dit, [*dit.transformer_blocks]
    encoder = uae.encoder
    return "the frozen captioner", encoder, [*encoder.model.visual.blocks, *encoder.model.language_model.layers]


@pytest.mark.parametrize("stage", ["g4u", "u4g"])
def test_a_stage_with_its_frozen_model_sharded_trains_as_one(tmp_path, launch, one_process, stage):
    """fsdp2 with `distributed.shard_frozen`: the frozen model's blocks (2a: the DiT, 2b: the captioner) are split
    over the ranks — each holds half of them —, its lockstep passes (renders, conditioning) gather a block at a time
    and its others (2b's captioning of new images, rank 0's report) the whole model; the step equals one process's,
    and the final folder holds the frozen model whole: the base model the run started from."""
    import uae_fast

    args = ["distributed.engine=fsdp2", "distributed.shard_frozen=true", "report_images=1", "save_final_model=true"]
    done = launch(tmp_path / "run", [*{"g4u": G4U, "u4g": U4G}[stage], "max_steps=1", *args])
    what, base, blocks = _frozen_model(uae_fast.load("tiny", seed=0), stage)
    found = re.search(rf"holds ([\d.]+) of its ([\d.]+) MiB of {what}", done.stdout)
    held, whole = float(found[1]), float(found[2])

    def mib(params) -> float:
        return sum(p.numel() * p.element_size() for p in params) / 2**20

    assert whole == pytest.approx(mib(base.parameters()), abs=0.01)
    assert held == pytest.approx(whole - mib(p for b in blocks for p in b.parameters()) / 2, abs=0.01)
    a, b = checkpoint_tensors(one_process[stage], 1), checkpoint_tensors(tmp_path / "run")
    assert_same_training(a, b, lr={"g4u": G4U_LR, "u4g": U4G_LR}[stage], steps=1)
    assert (tmp_path / "run" / "report" / "index.html").is_file()
    _, saved, _ = _frozen_model(uae_fast.load(tmp_path / "run" / "final"), stage)
    saved = saved.state_dict()
    assert saved.keys() == base.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in base.state_dict().items())


def zero3_everything(folder: Path, keep_whole_below: int = 0) -> list[str]:
    """ZeRO-3 settings partitioning every weight (or those of `keep_whole_below` elements and more): DeepSpeed's
    default keeps tensors under 1e5 elements whole on every rank, i.e. almost all of the tiny models'."""
    path = folder / "zero3.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    zero = {"stage": 3, "stage3_param_persistence_threshold": keep_whole_below}
    path.write_text(json.dumps({"zero_optimization": zero, "zero_allow_untested_optimizer": True}))
    return ["distributed.engine=zero3", f"distributed.deepspeed_config={path}"]


@pytest.mark.parametrize("engine", ["zero2", "zero3"])
def test_g4u_resumes_on_two_processes_from_one(tmp_path, launch, one_process, engine):
    """Step 3 on 2 ZeRO ranks, resumed from the one-process run's step-2 checkpoint == that run's step 3: weights,
    optimizer state, data position and sampling carry over to another world size and engine. ZeRO-3 (every weight
    partitioned, the LM head gathered for the fused loss) also writes the final model from its partitions: the
    released layout, loadable, holding the step-3 adapters."""
    resume = f"resume={one_process['g4u'] / 'checkpoint-2'}"
    engine_args = zero3_everything(tmp_path) if engine == "zero3" else [f"distributed.engine={engine}"]
    final = ["save_final_model=true"] if engine == "zero3" else []
    launch(tmp_path / "run", [*G4U, "max_steps=3", *engine_args, resume, *final])
    a, b = checkpoint_tensors(one_process["g4u"], 3), checkpoint_tensors(tmp_path / "run", 3)
    assert_same_training(a, b, lr=G4U_LR, steps=1)
    if engine == "zero3":
        import uae_fast

        uae_fast.load(tmp_path / "run" / "final")  # whole weights in the released layout
        saved = load_file(tmp_path / "run" / "final" / "llm_lora" / "adapter_model.safetensors")
        assert saved.keys() == b["llm_lora/adapter_model.safetensors"].keys()
        assert all(torch.equal(saved[k], b["llm_lora/adapter_model.safetensors"][k]) for k in saved)


@pytest.mark.parametrize(
    "stage, engine",
    [("u4g", "zero2"), ("u4g", "zero3"), ("unified", "fsdp2"), ("cold_start", "fsdp2"), ("cold_start", "zero3")],
)
def test_stage_2b_the_unified_schedule_and_the_cold_start_on_two_processes_train_as_one(
    tmp_path, launch, one_process, stage, engine
):
    """Stage 2b's SDE noise is drawn per render from its place in the whole batch, so its rollouts match; the
    unified schedule's stage that is not training sees the other's model whole; the cold start's reconstructions
    (greedy captions: sampled ones are drawn per rank) backpropagate through sharded blocks into both adapters —
    under zero3 one DeepSpeed engine over the two optimizers."""
    steps = 2 if stage == "unified" else 1  # unified: a 2a step, then a 2b step
    engine_args = zero3_everything(tmp_path) if engine == "zero3" else [f"distributed.engine={engine}"]
    args = [*{"u4g": U4G, "unified": UNIFIED, "cold_start": COLD_START}[stage], f"max_steps={steps}", *engine_args]
    launch(tmp_path / "run", args)
    a, b = checkpoint_tensors(one_process[stage], steps), checkpoint_tensors(tmp_path / "run")
    # unified: the 2b step renders with the captioner the 2a step trained, which differs by rounding between 1 and 2
    # processes; its advantages divide by a caption's tiny reward spread (same_noise: one SDE step apart), which
    # scales that rounding up to ~1e-4 of Adam's moments (measured 1.3e-4).
    lr, rtol = {"u4g": (U4G_LR, 1e-4), "unified": (U4G_LR, 1e-3), "cold_start": (1e-2, 1e-4)}[stage]
    assert_same_training(a, b, lr=lr, steps=steps, moment_rtol=rtol)


@pytest.mark.parametrize("engine, launcher", [("ddp", "torchrun"), ("zero2", "deepspeed"), ("zero3", "torchrun")])
def test_pretrain_on_two_processes_trains_as_one(tmp_path, launch, one_process, engine, launcher):
    """Full fine-tuning of the DiT and its EMA. zero3 (the EMA kept over each rank's partition, gathered to save;
    tensors under 1000 elements — biases, norms — kept whole, the matrices partitioned, so both kinds are covered)
    resumes from the one-process run's step-2 checkpoint — weights, EMA and optimizer state loaded into partitions —
    and trains steps 3-4 as that run did."""
    if engine == "zero3":
        resume = f"resume={one_process['pretrain'] / 'checkpoint-2'}"
        zero3 = zero3_everything(tmp_path, keep_whole_below=1000)
        launch(tmp_path / "run", [*PRETRAIN, "max_steps=4", "save_steps=2", *zero3, resume, "save_final_model=true"])
        a, b = checkpoint_tensors(one_process["pretrain"], 4), checkpoint_tensors(tmp_path / "run", 4)
        assert_same_training(a, b, lr=PRETRAIN_LR, steps=2)
        # the final DiT holds the EMA weights, the whole-kept tensors included
        final = load_file(tmp_path / "run" / "final" / "dit" / "diffusion_pytorch_model.safetensors")
        ema = b["ema/model.safetensors"]
        trained = [k for k in final if f"dit.{k}" in ema]  # (the rest are buffers: the position table)
        assert len(trained) == len([k for k in ema if k.startswith("dit.")])
        assert all(torch.equal(final[k], ema[f"dit.{k}"].to(final[k].dtype)) for k in trained)
        return
    launch(tmp_path / "run", [*PRETRAIN, "max_steps=2", f"distributed.engine={engine}"], launcher=launcher)
    a, b = checkpoint_tensors(one_process["pretrain"], 2), checkpoint_tensors(tmp_path / "run")
    assert_same_training(a, b, lr=PRETRAIN_LR, steps=2)


def test_pretrain_on_two_fsdp2_ranks_then_one_process_trains_as_one(tmp_path, launch, one_process):
    """Steps 1-2 on 2 FSDP2 ranks == one process's steps 1-2; then steps 3-4 in one process, resumed from the
    sharded run's checkpoint == one process's uninterrupted steps 1-4 (stage 1's data and noise do not depend on the
    weights, so the runs stay together)."""
    launch(tmp_path / "run", [*PRETRAIN, "max_steps=2", "distributed.engine=fsdp2"])
    assert_same_training(
        checkpoint_tensors(one_process["pretrain"], 2), checkpoint_tensors(tmp_path / "run", 2), lr=PRETRAIN_LR, steps=2
    )
    launch(tmp_path / "run", [*PRETRAIN, "max_steps=4", "resume=auto"], processes=1)
    assert_same_training(
        checkpoint_tensors(one_process["pretrain"], 4), checkpoint_tensors(tmp_path / "run", 4), lr=PRETRAIN_LR, steps=4
    )


def _start(out: Path, args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        launch_command(out, args, 2), **launch_options(out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _rank_pid(job: subprocess.Popen, rank: int, out: Path, deadline: float) -> int:
    """The pid of `rank`'s worker, once the run has written its second checkpoint (it is mid-run then)."""
    while time.time() < deadline:
        children = subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True, text=True).stdout.split()
        for pid in children:
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env and (out / "checkpoint-2").is_dir():
                return int(pid)
        assert job.poll() is None, "the run ended before it could be interrupted"
        time.sleep(0.2)
    raise AssertionError("the run did not reach its second checkpoint")


def test_a_killed_rank_stops_the_job_and_resume_finishes_it(tmp_path, launch):
    out = tmp_path / "run"
    args = [*PRETRAIN, "max_steps=100000", "save_steps=2"]
    job = _start(out, args)
    try:
        victim = _rank_pid(job, 1, out, time.time() + 120)
        killed_at = time.time()
        subprocess.run(["kill", "-9", str(victim)], check=True)
        output, _ = job.communicate(timeout=60)
    finally:
        job.kill()
    assert job.returncode != 0 and time.time() - killed_at < 60
    # torchrun's summary names the dead rank and how it died.
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)\s*\n\s*exitcode\s*:\s*-9", output), output[-3000:]
    from uae_fast.train.run_folder import checkpoint_step, latest_checkpoint

    latest = checkpoint_step(latest_checkpoint(out))
    done = launch(out, [*PRETRAIN, f"max_steps={latest + 2}", "save_steps=2", "resume=auto"], processes=1)
    assert (out / f"checkpoint-{latest + 2}").is_dir(), done.stdout[-2000:]  # resumed (on 1 of the 2) and finished


def test_a_hung_rank_stops_the_job_within_the_timeout(tmp_path):
    """A stopped (hung) rank: rank 0 gives up after `distributed.timeout_s` with a one-line error naming itself and
    exits; torchrun then tears the job down (its grace period for the hung worker is not part of this test)."""
    out = tmp_path / "run"
    job = _start(out, [*PRETRAIN, "max_steps=100000", "save_steps=2", "distributed.timeout_s=5"])
    try:
        victim = _rank_pid(job, 1, out, time.time() + 120)
        stopped_at = time.time()
        subprocess.run(["kill", "-STOP", str(victim)], check=True)
        line = next((text for text in job.stdout if "lost contact" in text), "")
        waited = time.time() - stopped_at
    finally:
        for pid in subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True, text=True).stdout.split():
            subprocess.run(["kill", "-9", pid])  # the stopped worker holds the output pipe open
        job.kill()
        job.communicate()
    assert line.startswith("uae-fast: rank 0: error: rank 0 of 2 lost contact with the other ranks"), line
    assert "distributed.timeout_s=5" in line and "--resume" in line
    assert waited < 60
