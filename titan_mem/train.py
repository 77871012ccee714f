"""The one Trainer: pretraining now, finetuning modes through `titan_mem.modes` (same loop, same data path,
same checkpoints). Run as `python -m titan_mem.train CONFIG.toml [--section.key=value ...]` or via
`run_train.sh` (torchrun).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from titan_mem import config as config_mod
from titan_mem.checkpoint import (
    CheckpointManager,
    RankState,
    SchedulerState,
    rng_state,
    set_rng_state,
)
from titan_mem.checkpoint.content import is_sparse_checkpoint, load_model_weights
from titan_mem.cli import run_cli
from titan_mem.components.lr import build_lr_scheduler
from titan_mem.components.metrics import MetricsLogger, drop_records_after, peak_flops, peak_memory_gib
from titan_mem.components.model import build_model
from titan_mem.components.optim import clip_grad_norm_
from titan_mem.components.run_control import RunLock, StopSignals, die_with_launcher
from titan_mem.config import Config
from titan_mem.data import build_dataloader, build_tokenizer
from titan_mem.data.hf_source import resolve_hf_files
from titan_mem.data.sources import build_source
from titan_mem.data.streams import merge_positions
from titan_mem.data.tokenizer import vocab_words
from titan_mem.distributed import (
    DistInfo,
    all_reduce_sum,
    broadcast_json,
    exit_process,
    init_distributed,
)
from titan_mem.errors import TrainingError
from titan_mem.eval.in_loop import build_in_loop_evaluator
from titan_mem.hf.retrofit import load_base_weights, model_args_for, resolve_base
from titan_mem.models.stats import estimate_memory_gib, flops_per_token, param_counts
from titan_mem.models.transformer import Transformer
from titan_mem.parallel.value_grads import value_table_grads
from titan_mem.preflight import check_launch


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.run_dir = Path(cfg.job.dump_folder)
        if cfg.job.deterministic:
            # cuBLAS is deterministic only with a fixed workspace (else use_deterministic_algorithms raises)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        die_with_launcher()
        self.dist: DistInfo = init_distributed(cfg.training.device)
        self.device = self.dist.device
        self.rank0 = self.dist.rank == 0
        self.lock = RunLock(self.run_dir)
        if self.rank0:
            self.lock.acquire()  # one live run per dump folder
        try:
            self._build()
        except BaseException:
            self.lock.release()  # a run that fails to start leaves the folder free in a process that lives on
            raise

    def _build(self) -> None:
        """Everything a run holds besides its process group and folder lock, in the order it depends on."""
        cfg = self.cfg
        self.stop = StopSignals()
        self.grad_accum, self.mode = check_launch(cfg, self.dist.world_size)

        self.tokenizer = build_tokenizer(cfg.tokenizer)
        # before the model: a hub that cannot be reached fails here, resolved once for all ranks
        source = build_source(cfg.data) if cfg.data.regime == "pretrain" else None
        resolve_hf_files(source, self.rank0, broadcast_json)
        self.model, self.model_args = build_model(
            cfg, self.dist, self.tokenizer, self.mode.converters, self.mode.fsdp_ignored
        )
        self.ckpt = CheckpointManager(
            self.run_dir / cfg.checkpoint.folder,
            rank=self.dist.rank,
            dp_world_size=self.dist.world_size,
            keep_latest_k=cfg.checkpoint.keep_latest_k,
            enabled=cfg.checkpoint.enable,
            regime=cfg.data.regime,
            async_save=cfg.checkpoint.enable and cfg.checkpoint.async_mode == "async",
        )
        if self.rank0:
            for unfinished in self.ckpt.remove_unfinished():  # safe: the lock excludes a live writer
                self._log(f"removed {unfinished} (an unfinished save or delete of an earlier run)")
        self.dataloader = build_dataloader(
            cfg.data,
            self.tokenizer,
            seq_len=cfg.training.seq_len,
            micro_batch_size=cfg.training.micro_batch_size,
            dp_rank=self.dist.rank,
            dp_world_size=self.dist.world_size,
            global_batch_size=cfg.training.global_batch_size,
            source=source,
        )
        self.step = 0
        resume = self.ckpt.resume_path(cfg.checkpoint.load_step) if cfg.checkpoint.enable else None
        initial = Path(cfg.checkpoint.initial_load_path) if cfg.checkpoint.initial_load_path else None
        # A new run (e.g. finetuning) starts from another run's weights; a sparse checkpoint resumes on them.
        base_first = resume is None or is_sparse_checkpoint(resume)
        if base_first and initial is not None and cfg.checkpoint.initial_load_model_only:
            load_model_weights(self.ckpt, initial, self.model, allow_missing=self.mode.new_tensor_names())
            self._log(f"loaded model weights from {initial}")
        elif base_first and initial is None and cfg.retrofit.base:  # a retrofit's start: the HF weights
            folder = resolve_base(cfg.retrofit.base)
            n = load_base_weights(self.model, folder, self.model_args, self.mode.new_tensor_names())
            layers = self.model_args.memory.layers
            self._log(
                f"loaded {n} tensors of {folder}; memory layers {layers} ({cfg.retrofit.mode}) start fresh"
            )
        trainable = self.mode.prepare(self.model)
        # How each value table's gradient is summed, clipped and stepped (the table in parallel/value_grads)
        self.value_grads = value_table_grads(self.model.value_tables())
        self.optimizer = self.mode.build_optimizer(self.model, trainable, self.value_grads)
        self.trainable = trainable
        self.scheduler = build_lr_scheduler(self.optimizer, cfg.lr_scheduler, cfg.training.steps)
        self.content = self.mode.build_checkpoint(self.model, self.optimizer)
        self.hooks = self.mode.build_hooks(self.model, self.optimizer, self.device, self.value_grads)
        self.hooks_read_slots = any(hook.reads_slots for hook in self.hooks)
        self.objective = self.mode.build_objective(self.model, self.device)
        if resume is None and initial is not None and not cfg.checkpoint.initial_load_model_only:
            resume = initial  # continue another run's full state (optimizer, schedule, data position) here
        if resume is not None:
            state = self.ckpt.load_full(resume, self.model, self._states())
            self.content.restore_files(resume)
            self.step = state["step"]
            self._log(f"resumed from {resume} at step {self.step}")
            if self.step > cfg.training.steps:
                raise TrainingError(
                    f"training.steps={cfg.training.steps} is below the step {self.step} of {resume}: raise "
                    "it to continue, or set another job.dump_folder"
                )
        self.data_iter = iter(self.dataloader)
        if self.rank0:  # logs continue from the loaded step; records of a crashed tail are dropped
            for log in ("metrics.jsonl", "selected_slots.jsonl", "eval_items.jsonl"):
                drop_records_after(self.run_dir / log, self.step)

        self.metrics = MetricsLogger(self.run_dir, enabled=self.rank0, tensorboard=cfg.metrics.tensorboard)
        self.evaluator = build_in_loop_evaluator(cfg, self.model, self.tokenizer, self.model_args.max_seq_len)
        self.flops_per_token = flops_per_token(self.model_args, cfg.training.seq_len)
        self.peak_flops = peak_flops(self.device)
        if self.rank0:
            config_mod.dump(cfg, self.run_dir / "config.json")
            counts = param_counts(self.model_args)
            self._log(
                f"model {cfg.retrofit.base or cfg.model.flavor}: {counts.total:,} params "
                f"({counts.memory_values:,} memory values), {self.dist.world_size} rank(s) on "
                f"{self.device.type}, grad accumulation {self.grad_accum}"
            )

    # ------------------------------------------------------------------ pieces

    def _log(self, msg: str) -> None:
        if self.rank0:
            print(msg, flush=True)

    def _states(self) -> dict[str, Any]:
        def get_rank_state() -> dict[str, Any]:
            return {"dataloader": self.dataloader.state_dict(), "rng": rng_state()}

        def put_rank_state(saved: list[dict[str, Any]]) -> None:
            if len(saved) == 1:  # this rank's own state: same world size
                self.dataloader.load_state_dict(saved[0]["dataloader"])
                set_rng_state(saved[0]["rng"])
            else:  # resized: every rank picks its streams' positions out of all saved ranks'
                self.dataloader.load_state_dict(merge_positions([s["dataloader"] for s in saved]))
                set_rng_state(saved[self.dist.rank % len(saved)]["rng"])

        return {
            **self.content.dcp_states(),
            "lr_scheduler": SchedulerState(self.scheduler),
            "rank_state": RankState(self.dist.rank, self.dist.world_size, get_rank_state, put_rank_state),
        }

    def _next_batches(self) -> list[dict[str, torch.Tensor]]:
        out = []
        for _ in range(self.grad_accum):
            try:
                batch = next(self.data_iter)
            except StopIteration:
                raise TrainingError(
                    f"data: the source ran out at step {self.step + 1} (set data.repeat=true or fewer steps)"
                ) from None
            out.append({k: v.to(self.device, non_blocking=True) for k, v in batch.items()})
        return out

    def train_step(self, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """One optimizer step over `grad_accum` micro-batches.

        Loss = sum of token losses / number of loss tokens in the *global* batch (all-reduced first), and
        FSDP sums gradients (divide factor 1): every token weighs the same whatever the rank or micro-batch.
        The mode's objective says what is summed and counted (modes.base.Objective: next-token loss over loss
        tokens, or a distillation heal's per-sequence error).
        """
        local_units = sum(self.objective.count(b) for b in batches)
        global_units = int(all_reduce_sum(torch.tensor([local_units], dtype=torch.float64)).item())
        if global_units == 0:
            raise TrainingError(f"step {self.step + 1}: the global batch has no loss tokens")
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        for i, batch in enumerate(batches):
            self._set_gradient_sync(i == len(batches) - 1)
            loss, slots = self.objective(self.model, batch, global_units, self.hooks_read_slots)
            for hook in self.hooks:
                hook.before_backward(self.model, batch, slots, i == len(batches) - 1)
            loss.backward()
            for hook in self.hooks:
                hook.on_micro_batch(self.model, batch, slots)
            loss_sum += loss.detach().double()
        loss_value = float(all_reduce_sum(loss_sum).item())
        if not torch.isfinite(torch.tensor(loss_value)):
            raise TrainingError(
                f"step {self.step + 1}: loss is {loss_value}; stopping without saving this step"
            )
        step_info: dict[str, Any] = {}
        for hook in self.hooks:
            step_info.update(hook.prepare_gradients(self.model))
        grad_norm = clip_grad_norm_(self.trainable, self.cfg.training.max_norm, self.value_grads.values())
        if not torch.isfinite(grad_norm):
            raise TrainingError(
                f"step {self.step + 1}: gradient norm is {float(grad_norm)}; stopping without saving "
                "this step"
            )
        self.optimizer.step()
        for hook in self.hooks:
            step_info.update(hook.after_step(self.step + 1))
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        # Throughput and MFU count every position computed (padding included: it costs the same FLOPs).
        positions = sum(b["input_ids"].numel() for b in batches) * self.dist.world_size
        return {"loss": loss_value, "grad_norm": float(grad_norm), "tokens": positions, **step_info}

    def _set_gradient_sync(self, final_micro_batch: bool) -> None:
        """FSDP2 reduce-scatters gradients only after the last micro-batch of a step (earlier ones accumulate
        unsharded: more memory, 1/grad_accum of the traffic); parallelism.sync_every_micro_batch restores
        the per-micro-batch reduce-scatter."""
        if (
            hasattr(self.model, "set_requires_gradient_sync")
            and not self.cfg.parallelism.sync_every_micro_batch
        ):
            self.model.set_requires_gradient_sync(final_micro_batch)

    def save(self, final: bool = False) -> None:
        """Save this step; `final` (the last step, a stop signal) is always written before returning."""
        if self.cfg.checkpoint.enable:
            background = not final and self.cfg.checkpoint.async_mode == "async"
            path = self.ckpt.save(
                self.step,
                self._states(),
                {"model_args": repr(self.model_args)},
                write_files=self.content.file_writer(),
                asynchronous=background,
            )
            self._log(f"{'saving' if background else 'saved'} checkpoint {path}")

    # ------------------------------------------------------------------ loop

    def train(self) -> list[float]:
        """Run until `training.steps`; returns the per-step losses of this launch."""
        losses: list[float] = []
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.stop.install()
        try:
            self._train_loop(losses)
            self.ckpt.wait()  # an asynchronous save still in flight (a crash leaves it .partial instead)
        finally:
            self.stop.uninstall()
            self.metrics.close()
            self.lock.release()
        return losses

    def _train_loop(self, losses: list[float]) -> None:
        cfg = self.cfg
        if self.evaluator and self.evaluator.at_start and self.step == 0:
            self.metrics.log(0, self.evaluator.run(0))  # the reference that forgetting is measured against
        t_last, tokens_since, data_wait, steps_since = time.perf_counter(), 0, 0.0, 0
        while self.step < cfg.training.steps:
            t_data = time.perf_counter()
            batches = self._next_batches()  # waits only when the loader is not ahead of training
            data_wait += time.perf_counter() - t_data
            info = self.train_step(batches)
            self.step += 1
            steps_since += 1
            losses.append(info["loss"])
            tokens_since += info["tokens"]
            last = self.step == cfg.training.steps
            if self.step % cfg.metrics.log_freq == 0 or self.step == 1 or last:
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                elapsed = time.perf_counter() - t_last
                tps = tokens_since / max(elapsed, 1e-9)
                per_device = tps / self.dist.world_size
                mfu = None
                if self.peak_flops:
                    mfu = 100.0 * self.flops_per_token * per_device / self.peak_flops
                self.metrics.log(
                    self.step,
                    {
                        "loss": info["loss"],
                        "grad_norm": info["grad_norm"],
                        "lr": self.scheduler.get_last_lr()[0],
                        "tokens_per_s": tps,
                        "tokens_per_s_per_device": per_device,
                        "mfu_pct": mfu,
                        "peak_mem_gib": peak_memory_gib(self.device),
                        "data_wait_s": data_wait / steps_since,  # per step: time training waited on data
                        **{k: v for k, v in info.items() if k not in ("loss", "grad_norm", "tokens")},
                    },
                )
                t_last, tokens_since, data_wait, steps_since = time.perf_counter(), 0, 0.0, 0
            if self.evaluator and self.evaluator.due(self.step, last):
                self.metrics.log(self.step, self.evaluator.run(self.step))
                t_last = time.perf_counter()  # evaluation time is not training throughput
            saved = self.step % cfg.checkpoint.interval == 0 or last
            if saved:
                self.save(final=last)
            if not last and self.stop.requested(self.device):
                if not saved:
                    self.save(final=True)
                self.ckpt.wait()
                self._log(f"stop signal received: saved step {self.step}, exiting (resume continues from it)")
                return


def dry_run(cfg: Config) -> None:
    """Print parameter counts and a per-GPU memory estimate from the meta-device model; allocate nothing."""
    try:
        n_words = vocab_words(cfg.tokenizer)
    except FileNotFoundError:  # a retrofit sizes its model from config.json; its tokenizer may be elsewhere
        if not cfg.retrofit.base:
            raise
        n_words = 0
    args = model_args_for(cfg, n_words)
    with torch.device("meta"):
        Transformer(args)  # builds the real module tree: a shape error here is a real error
    counts = param_counts(args)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    par = cfg.parallelism
    if par.data_parallel_shard_degree != -1:  # a dry run plans for that many ranks, wherever it runs
        world = par.data_parallel_shard_degree * par.data_parallel_replicate_degree
    grad_accum = config_mod.validate_batch(cfg, world)
    mem = estimate_memory_gib(
        args,
        world_size=config_mod.shard_degree(cfg, world),
        seq_len=cfg.training.seq_len,
        micro_batch_size=cfg.training.micro_batch_size,
        activation_checkpoint=cfg.training.activation_checkpoint == "full",
        memory_parallel=par.memory_parallel_degree != 0,
        memory_parallel_degree=world if par.memory_parallel_degree == -1 else par.memory_parallel_degree,
    )
    model = f"retrofit of {cfg.retrofit.base}" if cfg.retrofit.base else f"flavor {cfg.model.flavor}"
    tokens = f"tokenizer {n_words}" if n_words else "tokenizer not found, not checked"
    print(f"model {model}: vocab {args.vocab_size} ({tokens})")
    for key, value in counts.as_dict().items():
        print(f"  params {key:<18} {value:>16,}")
    print(f"  training FLOPs/token   {flops_per_token(args, cfg.training.seq_len):>16,.0f}")
    shard = config_mod.shard_degree(cfg, world)
    print(f"  data-parallel ranks {world} (FSDP groups of {shard}), grad accumulation {grad_accum}")
    for key, value in mem.items():
        print(f"  est. per-GPU {key:<20} {value:8.2f}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(config_mod.help_text())
        return 0

    dump_folder: list[str] = []  # known once the config parsed: where an unexpected error's traceback goes

    def run() -> None:
        cfg = config_mod.parse_args(argv)
        dump_folder.append(cfg.job.dump_folder)
        if cfg.job.dry_run:
            dry_run(cfg)
        else:
            Trainer(cfg).train()

    return run_cli(run, lambda: dump_folder[0] if dump_folder else None)


if __name__ == "__main__":
    exit_process(main())
