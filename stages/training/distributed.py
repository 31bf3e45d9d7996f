"""Training on many processes, GPUs and nodes through an existing engine, and the DeepSpeed config, both from a
trainer's params (`<trainer>.distributed` and `<trainer>.deepspeed`).

A trainer calls `launch(module, p)` first. With `launcher: none`, or inside a process that an engine started, it
returns and the stage trains. Otherwise it runs the engine (torchrun, accelerate or deepspeed) on the same module and
exits with the engine's status, so the DVC stage command stays `python -m stages.<trainer>`. Every process then
trains its share; only the main process (rank 0) logs to dvclive and writes outputs.
"""
import contextlib
import os
import socket
import subprocess
import sys

from stages.common.files import atomic_dir

LAUNCHED = "STAGES_LAUNCHED_BY"   # set for the processes an engine starts: they train instead of launching again


def launch(module: str, p: dict) -> None:
    """Start `module` under the configured engine and exit with its status, unless this process is the one to train."""
    d = p["distributed"]
    if d["launcher"] != "none" and LAUNCHED not in os.environ:
        command = engine_command(module, d)
        print(f"{module}: launching {' '.join(command)}", flush=True)
        raise SystemExit(subprocess.run(command, env={**os.environ, LAUNCHED: d["launcher"]}, check=False).returncode)
    if p["deepspeed"]["enabled"]:
        single_process_env()
        import deepspeed
        # DeepSpeed's own view of the process group; ZeRO-3 needs it to partition the model as it loads (without it,
        # it counts one process and rejects the batch sizes)
        deepspeed.init_distributed()


def engine_command(module: str, d: dict) -> list[str]:
    """The engine's own command line for `num_processes` per node on `num_nodes` nodes.

    Multi-node: the deepspeed launcher starts every node from this one over ssh, as its hostfile says. torchrun and
    accelerate run on each node, which must set NODE_RANK, MASTER_ADDR and MASTER_PORT (the node with rank 0 runs
    `dvc repro`, the others `python -m stages.<trainer>`); the repository must be on storage all nodes share.
    """
    procs, nodes = d["num_processes"], d["num_nodes"]
    if nodes > 1 and d["launcher"] != "deepspeed":
        missing = [name for name in ("NODE_RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
        if missing:
            raise SystemExit(f"distributed.num_nodes={nodes} with launcher {d['launcher']}: set {', '.join(missing)} "
                             f"on every node (or use launcher: deepspeed with a hostfile)")
    python = [sys.executable, "-m"]
    if d["launcher"] == "torchrun":
        where = (["--node-rank", os.environ["NODE_RANK"], "--master-addr", os.environ["MASTER_ADDR"],
                  "--master-port", os.environ["MASTER_PORT"]] if nodes > 1 else ["--standalone"])
        return python + ["torch.distributed.run", "--nnodes", str(nodes), "--nproc-per-node", str(procs), *where,
                         "-m", module]
    if d["launcher"] == "accelerate":
        where = (["--machine_rank", os.environ["NODE_RANK"], "--main_process_ip", os.environ["MASTER_ADDR"],
                  "--main_process_port", os.environ["MASTER_PORT"]] if nodes > 1
                 else ["--main_process_port", str(free_port())])
        # --multi_gpu selects accelerate's torchrun-based launcher, which also runs CPU processes (gloo)
        many = ["--multi_gpu"] if procs * nodes > 1 else []
        return python + ["accelerate.commands.launch", "--num_processes", str(procs * nodes), "--num_machines",
                         str(nodes), *many, *where, "--mixed_precision", "no", "--dynamo_backend", "no",
                         "-m", module]
    if d["launcher"] == "deepspeed":
        hosts = ["--hostfile", d["hostfile"]] if d["hostfile"] else []
        return python + ["deepspeed.launcher.runner", *hosts, "--num_nodes", str(nodes), "--num_gpus", str(procs),
                         "--master_port", str(free_port()), "--no_local_rank", "--module", module]
    raise ValueError(f"unknown launcher {d['launcher']!r}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process_env() -> None:
    """DeepSpeed in a process no launcher started: give it the one-process group its launcher would have set up
    (without it, DeepSpeed falls back to MPI discovery and fails on a missing mpi4py)."""
    if "RANK" not in os.environ:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0",
                          WORLD_SIZE="1")


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def barrier() -> None:
    """Wait for every process (nothing to wait for in a single process)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def finish() -> None:
    """Close the process group together, once every process is done: a process that exits while another still uses
    the group, leaving torch to tear it down at interpreter exit, aborted now and then under ZeRO-3 on CPU
    ("terminate called without an active exception", 1 run in 8 here)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def output_dir(path):
    """atomic_dir on the main process; the other processes get the same scratch path, and never write to it (the
    Trainer saves on rank 0 only, after gathering what ZeRO-3 partitioned across all of them)."""
    if is_main_process():
        with atomic_dir(path) as partial:
            yield partial
    else:
        yield path.with_name(path.name + ".partial")


def deepspeed_config(ds: dict) -> dict | None:
    """The DeepSpeed config for `<trainer>.deepspeed`, or None when it is off.

    Everything the Trainer knows (learning rate, betas, epsilon, weight decay, batch sizes, accumulation, clipping,
    bf16/fp16) is "auto": transformers fills it in from TrainingArguments, which come from params.yaml, so nothing is
    set in two places. The learning-rate schedule is the Trainer's own (no "scheduler" section), as without DeepSpeed.
    """
    if not ds["enabled"]:
        return None
    if ds["offload_params"] and ds["zero_stage"] != 3:
        raise SystemExit(f"deepspeed.offload_params needs zero_stage 3 (it is {ds['zero_stage']}): only ZeRO-3 "
                         f"partitions the parameters")
    zero = {"stage": ds["zero_stage"], "overlap_comm": True, "contiguous_gradients": True,
            "reduce_bucket_size": "auto"}
    if ds["offload_optimizer"]:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds["offload_params"]:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if ds["zero_stage"] == 3:
        zero.update(stage3_prefetch_bucket_size="auto", stage3_param_persistence_threshold="auto",
                    stage3_gather_16bit_weights_on_model_save=True)   # save_model writes whole weights, not shards
    # torch's AdamW unless the optimizer state is offloaded, where DeepSpeed's CPU Adam (built on first use) is what
    # makes offload fast; its fused GPU Adam would need a CUDA compiler at run time
    adam = {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto",
            "torch_adam": not ds["offload_optimizer"]}
    return {"zero_optimization": zero, "optimizer": {"type": "AdamW", "params": adam},
            "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
            "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}
