"""`ipadapter train`: the paper's recipe on Hugging Face Accelerate, from one CPU to many GPUs.

Randomness is stateless: data order comes from (seed, epoch) and every step's dropout draws, timesteps and noise from
(seed, step, process), so a resumed run repeats exactly what an uninterrupted one would have done.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ..adapter import IPAdapter
from ..checkpoint import load_adapter
from ..compiling import check_requirements
from ..sources import error_line
from ..variants import get_variant
from . import sharded
from .cache import EmbeddingCache, build_cache, fingerprint
from .checkpointing import (check_resumable, list_checkpoints, load_training_state, resolve_resume, save_checkpoint,
                            set_aside_later)
from .config import TrainConfig, field_help
from .data import StreamingDataset, TrainDataset, collate, is_webdataset, iter_webdataset, list_shards, read_records
from .models import encode_text, load_frozen_models, tokenize_fn


class TrainingInterrupted(Exception):
    """The run was stopped by SIGINT (Ctrl-C) or SIGTERM (e.g. a cluster's preemption) and saved a checkpoint first."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None) -> None:
        name = signal.Signals(signum).name
        super().__init__(f"interrupted by {name} at step {step}; saved {checkpoint}; run the same command with "
                         "--resume latest to continue exactly where it stopped")  # fmt: skip
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGINT / SIGTERM to the main process, which stops after its step and then shuts them
    down (a signal sent to the whole process group would otherwise kill them first, and PyTorch would raise "worker
    killed" in the middle of that step). A worker whose main process dies exits by itself (PyTorch's watchdog)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):  # blocked while the worker started (see `started_workers`)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


def started_workers(loader: DataLoader) -> Iterator:
    """`iter(loader)`, its worker processes started with SIGINT / SIGTERM blocked: between the fork and
    `ignore_stop_signals`, PyTorch's own worker handlers would let a signal to the process group kill a new worker
    (streamed data starts new workers every epoch). A signal meanwhile reaches the main process once unblocked."""
    if loader.num_workers == 0 or not hasattr(signal, "pthread_sigmask"):
        return iter(loader)
    stop = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class AdapterTrainingModule(nn.Module):
    """Frozen UNet + trainable adapter: image features -> tokens -> noise prediction.

    `compile`: a torch.compile backend for the UNet call (the adapter's processors inside it included), or "" for
    none. Only the training forward is compiled: `self.unet` stays the plain module (validation generates with it,
    and the state dict keeps its keys). The projection and `set_tokens` stay eager, so that every step enters the
    compiled code with the same Python state and nothing recompiles."""

    def __init__(self, unet: nn.Module, adapter: IPAdapter, compile: str = "") -> None:
        super().__init__()
        self.unet = unet
        self.adapter = adapter
        # a plain attribute, not a submodule: the compiled wrapper would list the UNet's weights a second time
        self.__dict__["run_unet"] = torch.compile(unet, backend=compile) if compile else unet

    def forward(self, noisy, timesteps, text, image=None, face_id=None, added_cond_kwargs=None) -> torch.Tensor:
        tokens = self.adapter.project(image=image, face_id=face_id)  # (B, T, C)
        self.adapter.set_tokens(tokens)
        return self.run_unet(noisy, timesteps, text, added_cond_kwargs=added_cond_kwargs).sample


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The generator for one optimizer step on one process (stateless, hence exactly resumable)."""
    # mod 2**64: what manual_seed does to the values it accepts (negatives wrap), for any seed
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1009 + rank) % 2**64)


def epoch_batches(n: int, seed: int, epoch: int, start: int, batch: int, world: int, rank: int) -> Iterator[list[int]]:
    """This process's index batches of one epoch, from sample `start` of the epoch's permutation on."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed((seed + 7919 * epoch) % 2**64)).tolist()
    step = batch * world
    for pos in range(start, n - step + 1, step):  # drop the ragged end so every process takes equal steps
        yield order[pos + rank * batch : pos + (rank + 1) * batch]


def wait_for_cache(folder: Path, poll: float = 2.0, notice_after: float = 120.0) -> None:
    """Until the main process has written `folder`/index.json (a finished cache). A process that is still waiting
    after `notice_after` seconds says what for, once: with several machines the cache folder must be on a file
    system all of them see. If the main process fails, the launcher (torchrun, accelerate launch) ends this one."""
    started, told = time.monotonic(), False
    while not (folder / "index.json").is_file():
        if not told and time.monotonic() - started > notice_after:
            print(f"waiting for the main process to build the embedding cache in {folder} (every process reads it "
                  "there: with several machines it must be on a shared file system)", file=sys.stderr, flush=True)  # fmt: skip
            told = True
        time.sleep(poll)


class RunBatches:
    """This process's index batches of every epoch from (epoch, start) on, without end: `epoch_batches` chained.
    `lengths` holds the number of batches of each epoch begun and not yet taken off by the consumer, appended before
    the epoch's first batch is produced."""

    def __init__(self, n: int, seed: int, epoch: int, start: int, batch: int, world: int, rank: int) -> None:
        self.args, self.epoch, self.start = (n, seed, batch, world, rank), epoch, start
        self.lengths: collections.deque[int] = collections.deque()

    def __iter__(self) -> Iterator[list[int]]:
        n, seed, batch, world, rank = self.args
        epoch, start = self.epoch, self.start
        while True:
            batches = list(epoch_batches(n, seed, epoch, start, batch, world, rank))
            self.lengths.append(len(batches))
            yield from batches
            epoch, start = epoch + 1, 0


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device. On CUDA through pinned memory without blocking, so that preparing the next step's inputs does
    not wait for the GPU to finish the current step (a plain `.to("cuda")` from pageable memory synchronizes)."""
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def drop_masks(r: torch.Tensor, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """One uniform draw per sample: [0, p_i) image only, [p_i, p_i+p_t) text only, then p_b both (paper §4.1)."""
    pi, pt, pb = cfg.drop_image, cfg.drop_text, cfg.drop_both
    drop_image = (r < pi) | ((r >= pi + pt) & (r < pi + pt + pb))
    drop_text = (r >= pi) & (r < pi + pt + pb)
    return drop_image, drop_text


class Trainer:
    """One training run (see `TrainConfig`)."""

    def __init__(self, cfg: TrainConfig, show_progress: bool = True) -> None:
        try:
            import accelerate  # noqa: F401
        except ImportError as e:  # `pip install ipadapter` has what generation needs; training needs the extra
            raise ImportError(f"ipadapter train needs Hugging Face Accelerate ({e}): pip install 'ipadapter[train]' "
                              "(from a clone: pip install -e \".[train]\")") from e  # fmt: skip
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import DistributedType, InitProcessGroupKwargs

        # Accelerate keeps its settings in a process-wide singleton; a second run in the same process (a notebook,
        # the tiny-world build, tests) may want another precision. The distributed set-up itself is kept.
        AcceleratorState._reset_state()
        cfg = cfg.resolved()  # the precision the launcher asked for, unless the run names one
        self.cfg = cfg
        self.output = Path(cfg.output)
        tracker = None
        try:
            import tensorboard  # noqa: F401

            tracker = "tensorboard"
        except ImportError:
            pass
        import os

        # Several processes without a GPU (torchrun on CPUs): Accelerate uses gloo only when told cpu=True, which
        # would also drop a DeepSpeed config; DeepSpeed on CPUs gets gloo named instead.
        several = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
        deepspeed = sharded.requested()
        self.accelerator = Accelerator(
            cpu=several and not deepspeed,
            mixed_precision=cfg.mixed_precision,
            gradient_accumulation_steps=cfg.gradient_accumulation,
            log_with=tracker,
            project_dir=str(self.output),
            kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if several and deepspeed else None,
        )
        self.deepspeed = self.accelerator.distributed_type == DistributedType.DEEPSPEED
        self.show_progress = show_progress and self.accelerator.is_main_process
        self.variant = get_variant(cfg.variant)
        self.feature = self.variant.image_feature
        self.skipped = 0

    # ---- set-up -------------------------------------------------------------------------------------------------
    def _weight_dtype(self) -> torch.dtype:
        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.cfg.mixed_precision, torch.float32)

    def setup(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        check_requirements(cfg.compile, acc.device.type)  # before any model work
        if not cfg.data:
            raise ValueError("--data is required: a JSON list, JSON Lines, a folder of images with .txt captions, "
                             "WebDataset shards (*.tar, {a..b}) or tinyworld:N")  # fmt: skip
        for flag, value in (("--base", cfg.base), ("--image-encoder", cfg.image_encoder)):
            if value and "::" not in value and (value.startswith(("/", "./", "../", "~")) or value.count("/") > 1) \
                    and not Path(value).expanduser().exists():  # a path (hub ids are "owner/name")  # fmt: skip
                raise FileNotFoundError(f"{flag} {value} not found (expected a diffusers folder or a hub id owner/name)")
        for flag, folder in (("--output", self.output), ("--cache-dir", Path(cfg.cache_dir) if cfg.cache_dir else None)):
            if folder is not None and folder.exists() and not folder.is_dir():
                raise ValueError(f"{flag} {folder} is a file; expected a folder")
        self.resume_from = resolve_resume(self.output, cfg.resume)
        if self.resume_from is None and list_checkpoints(self.output):
            raise ValueError(
                f"{self.output} already holds checkpoints; pass --resume latest to continue, or a new --output"
            )
        held = list_checkpoints(self.output)
        if self.resume_from is not None and held and self.resume_from.resolve().parent != self.output.resolve():
            # --keep-last would prune this folder's checkpoints and its train_config.json would be replaced
            raise ValueError(
                f"--resume {self.resume_from} is another run's checkpoint and --output {self.output} holds this "
                f"run's checkpoints (up to {held[-1].name}); continue it in a new --output, or resume one of "
                f"{self.output}'s own checkpoints"
            )
        if cfg.resume == "latest" and self.resume_from is None and acc.is_main_process:
            print(f"--resume latest: {self.output} holds no checkpoint yet; starting at step 0", file=sys.stderr)
        sharded.check_fsdp(acc.distributed_type, acc.num_processes)
        if self.deepspeed:  # its config checked and completed before any model work
            sharded.configure(acc, cfg.batch_size, cfg.gradient_accumulation, cfg.max_grad_norm)
        resumed = None
        if self.resume_from is not None:  # before loading any model
            check_resumable(self.resume_from, dataclasses.asdict(cfg))
            resumed = load_training_state(self.resume_from)
            sharded.check_resumable(self.resume_from, resumed, self.deepspeed, acc.num_processes)
        self._read_data()  # before the models: a wrong path or an empty dataset costs no model load
        if resumed is not None:
            self._check_resumed_data(resumed)
        models = load_frozen_models(cfg.base, cfg.image_encoder, self.feature != "none", self._weight_dtype())
        for module in models.frozen():
            module.to(acc.device)
        if cfg.channels_last:  # the same values; cuDNN's tensor-core convolutions work in NHWC without transposes
            models.unet.to(memory_format=torch.channels_last)
        self.models = models
        embed_dim = models.image_encoder.feature_dim(self.feature) if models.image_encoder is not None else None
        if cfg.init_adapter and self.resume_from is not None:  # the checkpoint holds every weight: the starting
            # file is not needed (it may be gone, or the run on another machine); the checkpoint's adapter is the run's
            adapter = self._resumed_adapter()
            self._check_variant(adapter.config, str(self.resume_from))
            adapter = load_adapter(self.resume_from / "adapter.safetensors", unet=models.unet,
                                   image_encoder=models.image_encoder)  # fmt: skip
        elif cfg.init_adapter:
            adapter = self._init_adapter(models)
        else:
            torch.manual_seed(cfg.seed)  # the projection's random init is part of the run's reproducibility
            adapter = IPAdapter.for_unet(models.unet, cfg.variant, image_embed_dim=embed_dim)
        if self.resume_from is not None:
            try:
                adapter.load_state_dict(self._resumed_adapter().state_dict())
            except RuntimeError as error:  # strict loading: another base or image encoder than the run's
                encoder = repr(cfg.image_encoder) if cfg.image_encoder else "the base folder's"
                raise ValueError(
                    f"cannot resume from {self.resume_from}: its adapter does not fit this run's model (base "
                    f"{cfg.base!r}, image encoder {encoder}): {str(error).splitlines()[0]}"
                ) from error
        adapter.config.extra.update({"base": cfg.base, "image_encoder": cfg.image_encoder})
        self.adapter = adapter.float().train().attach(models.unet)
        if cfg.gradient_checkpointing:
            models.unet.enable_gradient_checkpointing()
        self.tokenize = tokenize_fn(models.tokenizers)
        self._setup_data()
        params = [p for p in self.adapter.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay
        )
        warmup = cfg.warmup_steps
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0
        )
        self.module, self.optimizer = acc.prepare(AdapterTrainingModule(models.unet, self.adapter, cfg.compile), optimizer)
        self.step, self.epoch, self.position = 0, 0, 0
        if resumed is not None:
            if self.deepspeed:
                sharded.load_shards(self.optimizer, resumed["optimizer_shards"])
            else:
                self.optimizer.load_state_dict(resumed["optimizer"])
            self.lr_scheduler.load_state_dict(resumed["lr_scheduler"])
            # both restore the checkpoint's hyper-parameters (each group's lr, weight decay, betas; the schedule's
            # base rate): this run's are the ones asked for (a resume may change them), the same values otherwise
            self.lr_scheduler.base_lrs = [cfg.learning_rate] * len(self.optimizer.param_groups)
            factor = self.lr_scheduler.lr_lambdas[0](self.lr_scheduler.last_epoch)
            for group in self.optimizer.param_groups:
                group.update(lr=cfg.learning_rate * factor, initial_lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                             betas=(cfg.adam_beta1, cfg.adam_beta2))  # fmt: skip
            self.step, self.epoch, self.position = resumed["step"], resumed["epoch"], resumed["position"]
            self.skipped = resumed.get("skipped", 0)
            # each process its own place in the data: one whose micro-batch was all unreadable took the next one and
            # runs ahead of the others (checkpoints before "ranks" hold the main process's place only)
            ranks = resumed.get("ranks")
            if ranks is not None and len(ranks) == acc.num_processes:
                self.epoch, self.position, self.skipped = (int(v) for v in ranks[acc.process_index])

    def _init_adapter(self, models) -> IPAdapter:
        """The checkpoint to fine-tune (a file, or tinyworld-base / tinyworld-plus), checked against --variant before
        it is checked against the UNet and the image encoder, so that a variant mismatch is named as one."""
        from ..sources import resolve_adapter

        path = resolve_adapter(self.cfg.init_adapter)
        self._check_variant(load_adapter(path).config, f"--init-adapter {self.cfg.init_adapter}")
        return load_adapter(path, unet=models.unet, image_encoder=models.image_encoder)

    def _check_variant(self, found, name: str) -> None:
        want = self.variant
        if (found.projection, found.image_feature, found.attention) != (want.projection, want.image_feature, want.attention):
            raise ValueError(
                f"{name} is a {found.variant!r} adapter ({found.projection} projection, {found.image_feature} "
                f"features) but --variant is {self.cfg.variant!r} ({want.projection} projection, {want.image_feature} "
                f"features); pass the --variant of the checkpoint (e.g. {found.variant!r})"
            )

    def _resumed_adapter(self) -> IPAdapter:
        """The checkpoint's adapter; an unreadable one names the checkpoint to resume from instead."""
        try:
            return load_adapter(self.resume_from / "adapter.safetensors")
        except (ValueError, OSError) as error:
            earlier = [c for c in list_checkpoints(self.output) if c.resolve() != self.resume_from.resolve()]
            hint = f"the previous checkpoint is {earlier[-1]} (--resume {earlier[-1]})" if earlier else "no other checkpoint exists"
            raise ValueError(f"cannot resume from {self.resume_from}: {error}; {hint}") from error

    def _read_data(self) -> None:
        """The records of a finite dataset (`self.records`; None for WebDataset shards, streamed later)."""
        cfg = self.cfg
        self.streaming = is_webdataset(cfg.data)
        if self.streaming:
            if cfg.image_root:
                raise ValueError(f"--image-root is the folder of a JSON / JSONL list's image_file paths; --data "
                                 f"{cfg.data} is WebDataset shards, whose records hold their images")  # fmt: skip
            if cfg.cache_embeddings:
                raise ValueError("the embedding cache needs a finite dataset (JSON, JSONL or a folder), not WebDataset shards")
            self.records = None
            shards = [Path(s).name for s in list_shards(cfg.data)]  # names: the run may move to another disk
            self.data_identity = {"shards": len(shards), "digest": _digest([shards, cfg.max_samples])}
            return
        records = read_records(cfg.data, cfg.image_root)
        if cfg.max_samples:
            records = records[: cfg.max_samples]
        if self.variant.id_embed_dim:
            missing = [r.key for r in records if not r.face_id_path]
            if missing:
                raise ValueError(
                    f"--variant {cfg.variant} trains on face embeddings: every record needs an 'id_embed_file'; "
                    f"{len(missing)} of {len(records)} in {cfg.data} have none (first: {missing[0]})"
                )
        if not records:
            raise ValueError(f"no usable training samples in {cfg.data}")
        # which records, whatever disk they lie on (keys and captions, in the data's order)
        self.data_identity = {"records": len(records), "digest": _digest([[r.key, r.text] for r in records])}
        world = self.accelerator.num_processes
        if len(records) < cfg.batch_size * world:  # before any model loads (checked again after unreadable ones)
            raise ValueError(f"{len(records)} samples cannot fill one batch of {cfg.batch_size} x {world} processes")
        self.records = records

    def _check_resumed_data(self, resumed: dict) -> None:
        """A resume continues the run's data order at its saved (epoch, position): on other data, or past its end, it
        would train on something the run's course never held. Both are refused before any model loads."""
        cfg, checkpoint = self.cfg, self.resume_from
        if resumed["step"] >= cfg.max_steps:
            raise ValueError(f"{checkpoint} is at step {resumed['step']}, already at --max-steps {cfg.max_steps}: nothing "
                             f"to train (raise --max-steps to continue the run)")  # fmt: skip
        saved = resumed.get("data")
        if saved is not None and saved != self.data_identity:
            kind = "records" if "records" in self.data_identity else "shards"
            count = saved.get(kind, "?"), self.data_identity[kind]
            differ = f"{count[0]} {kind} there, {count[1]} now" if count[0] != count[1] else \
                f"the same number of {kind}, other names, captions or order"  # fmt: skip
            raise ValueError(
                f"cannot resume from {checkpoint}: its run trained on other data than --data {cfg.data} ({differ}), "
                f"and a resume continues at its saved position in that data; resume with the run's own data, or start "
                f"a new stage on this data: --init-adapter {checkpoint / 'adapter.safetensors'} with a new --output"
            )

    def _setup_data(self) -> None:
        cfg, models = self.cfg, self.models
        clip = models.image_encoder.processor if models.image_encoder is not None else None
        self.cache: EmbeddingCache | None = None
        if self.streaming:
            self.validation_records = [r for _, r in zip(range(cfg.validation_images), iter_webdataset(cfg.data))]
            if self.variant.id_embed_dim:  # a FaceID run needs face-embedding members (`face.npy`)
                first = next((r for r in iter_webdataset(cfg.data) if not r.problem), None)
                if first is not None and not first.face_id_path:
                    raise ValueError(f"--variant {cfg.variant} trains on face embeddings: the records of {cfg.data} "
                                     f"need a face.npy member (one 512-d ArcFace embedding); {first.key} has none")  # fmt: skip
            self.dataset = None
            return
        records = self.records
        self.validation_records = records[: cfg.validation_images]
        dataset = TrainDataset(records, cfg.resolution, clip, self.tokenize)
        if cfg.cache_embeddings:
            expected = fingerprint(base=cfg.base, image_encoder=cfg.image_encoder, feature=self.feature,
                                   resolution=cfg.resolution, samples=len(records), records=records_digest(records),
                                   dtype=self._weight_dtype(),
                                   vae_dtype=models.vae.dtype)  # (SDXL's VAE stays float32 under fp16: `models`)
            folder = Path(cfg.cache_dir or self.output / "cache")
            # The main process builds, the others wait for its index.json outside any collective: a build takes
            # hours on a large dataset, and a barrier times out long before (NCCL: 10 minutes, gloo: 30).
            if self.accelerator.is_main_process:
                build_cache(folder, dataset, models, self.feature, self.tokenize, expected,
                            num_workers=cfg.num_workers, show_progress=self.show_progress)
            else:
                wait_for_cache(folder)
            self.accelerator.wait_for_everyone()
            self.cache = EmbeddingCache(folder, expected)
            self.skipped = self.cache.skipped  # counted once, when the cache was built (a resume restores its count)
            dataset = self.cache
        self.dataset = dataset
        if not len(dataset):
            raise ValueError(f"no usable training samples in {cfg.data}")

    # ---- data ---------------------------------------------------------------------------------------------------
    def batches(self) -> Iterator[dict]:
        """Collated micro-batches for this process, resuming at (epoch, position)."""
        cfg, acc = self.cfg, self.accelerator
        world, rank = acc.num_processes, acc.process_index
        if self.streaming:
            while True:
                start = self.position
                ds = StreamingDataset(cfg.data, cfg.resolution,
                                      self.models.image_encoder.processor if self.models.image_encoder else None,
                                      self.tokenize, skip=start, batch_size=cfg.batch_size * world,
                                      max_samples=cfg.max_samples, seed=cfg.seed, epoch=self.epoch)  # fmt: skip
                loader = DataLoader(ds, batch_size=cfg.batch_size * world, num_workers=cfg.num_workers,
                                    worker_init_fn=ignore_stop_signals,
                                    collate_fn=lambda items: items)
                any_batch = any_full = False
                for items in started_workers(loader):
                    any_batch = True
                    self.position += len(items)
                    if len(items) < cfg.batch_size * world:
                        # the stream's ragged end, dropped as finite data's is: a short global batch would leave a
                        # later process an empty slice, and that process alone would go on to the next epoch
                        continue
                    any_full = True
                    yield collate(items[rank * cfg.batch_size : (rank + 1) * cfg.batch_size])
                if not any_batch and start == 0:  # (a resume saved after an epoch's last batch finds none: next epoch)
                    raise ValueError(f"no samples in {cfg.data}")
                if not any_full and start == 0:
                    raise ValueError(f"{cfg.data} holds {self.position} records, fewer than one batch of "
                                     f"{cfg.batch_size} x {world} processes")  # fmt: skip
                self.epoch, self.position = self.epoch + 1, 0
        n = len(self.dataset)
        if n < cfg.batch_size * world:
            raise ValueError(f"{n} samples cannot fill one batch of {cfg.batch_size} x {world} processes")
        # One loader for the whole run over an endless batch sampler: its workers start once, not at every epoch
        # (restarting them cost a quarter of the throughput with 8-step epochs and 2 workers on 2 CPU cores). The sampler
        # runs ahead of the steps (prefetching), so it records each epoch's number of batches and the epoch and
        # position advance here, as batches are taken.
        sampler = RunBatches(n, cfg.seed, self.epoch, self.position, cfg.batch_size, world, rank)
        collate_fn = collate_cached if self.cache is not None else collate
        loader = DataLoader(self.dataset, batch_sampler=sampler, num_workers=cfg.num_workers, collate_fn=collate_fn,
                            worker_init_fn=ignore_stop_signals)  # fmt: skip
        taken = 0  # batches taken from the current epoch
        for batch in started_workers(loader):
            while taken == sampler.lengths[0]:  # (0 for a resume saved after an epoch's last batch)
                sampler.lengths.popleft()
                self.epoch, self.position, taken = self.epoch + 1, 0, 0
            taken += 1
            self.position += cfg.batch_size * world
            yield batch

    # ---- one step -----------------------------------------------------------------------------------------------
    def inputs(self, batch: dict, g: torch.Generator) -> tuple[dict, torch.Tensor, torch.Tensor]:
        """(model kwargs, noisy latents' target, timesteps) for one batch, with the recipe's dropout applied."""
        cfg, models, device = self.cfg, self.models, self.accelerator.device
        b = len(batch["index"])
        drop_image, drop_text = drop_masks(torch.rand(b, generator=g), cfg)
        if self.cache is not None:
            mean, std = batch["latent_mean"], batch["latent_std"]
            text, pooled = batch["text"], batch.get("text_pooled")
            uncond = self.cache.uncond
            text = torch.where(drop_text[:, None, None], uncond["text"], text)
            if pooled is not None:
                pooled = torch.where(drop_text[:, None], uncond["text_pooled"], pooled)
            image = batch.get("image")
            if image is not None:
                image = torch.where(drop_image.view(-1, *[1] * (image.ndim - 1)), uncond["image"], image)
        else:
            with torch.no_grad():
                dist = models.vae.encode(batch["pixels"].to(device, models.vae.dtype)).latent_dist
                mean, std = dist.mean.float().cpu(), dist.std.float().cpu()
                empty = self.tokenize("")
                ids = tuple(torch.where(drop_text[:, None], e[None], t) for e, t in zip(empty, batch["input_ids"]))
                text, pooled = encode_text(models, ids)
                image = None
                if models.image_encoder is not None and self.feature != "none":
                    clip = batch["clip_pixels"]
                    if self.feature == "penultimate":  # official Plus trainer: zero pixels before the encoder
                        clip = torch.where(drop_image[:, None, None, None], torch.zeros_like(clip), clip)
                    image = models.image_encoder.encode(clip, self.feature)
                    if self.feature == "pooled":  # official base trainer: zero embedding after the encoder
                        image = torch.where(drop_image[:, None].to(image.device), torch.zeros_like(image), image)
        latents = (mean + std * torch.randn(mean.shape, generator=g)) * models.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=g)
        if cfg.noise_offset:
            noise = noise + cfg.noise_offset * torch.randn(b, latents.shape[1], 1, 1, generator=g)
        scheduler = models.noise_scheduler
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=g)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        if scheduler.config.prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise

        def put(x: torch.Tensor) -> torch.Tensor:
            return to_device(x, device)

        noisy = put(noisy)
        if cfg.channels_last:
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        kwargs: dict = {"noisy": noisy, "timesteps": put(timesteps), "text": put(text).float()}
        if image is not None:
            kwargs["image"] = put(image).float()
        if "face_id" in batch:
            kwargs["face_id"] = put(torch.where(drop_image[:, None], 0.0, batch["face_id"].float()))
        if models.is_sdxl:
            res = float(cfg.resolution)
            time_ids = torch.cat(
                [batch["original_size"].float(), batch["crop_top_left"].float(), torch.tensor([[res, res]]).repeat(b, 1)],
                dim=1,
            )
            kwargs["added_cond_kwargs"] = {"text_embeds": put(pooled).float(), "time_ids": put(time_ids)}
        return kwargs, put(target), timesteps

    # ---- the loop -----------------------------------------------------------------------------------------------
    def state(self, optimizer_shards: list[dict] | None = None, ranks: list[list[int]] | None = None) -> dict:
        """What a checkpoint's training_state.pt holds; under DeepSpeed every process's optimizer shard (gathered by
        `save`) instead of the one optimizer state. `ranks`: every process's [epoch, position, skipped] (`data_places`);
        "epoch", "position" and "skipped" are the main process's."""
        optimizer = {"optimizer_shards": optimizer_shards} if self.deepspeed else {"optimizer": self.optimizer.state_dict()}
        return {
            "step": self.step,
            "processes": self.accelerator.num_processes,
            "epoch": self.epoch,
            "position": self.position,
            "skipped": self.skipped,
            "ranks": ranks if ranks is not None else [[self.epoch, self.position, self.skipped]],
            "data": self.data_identity,
            **optimizer,
            "lr_scheduler": self.lr_scheduler.state_dict(),
        }

    def autocast(self):
        """Autocast under DeepSpeed with mixed precision: DeepSpeed runs the module in that dtype and Accelerate adds no
        autocast there, while the inputs arrive in float32. Elsewhere nothing: Accelerate wraps the forward itself."""
        if self.deepspeed and self.cfg.mixed_precision != "no":
            return torch.autocast(self.accelerator.device.type, dtype=self._weight_dtype())
        return contextlib.nullcontext()

    def check_finite(self, losses: list[tuple[int, torch.Tensor]]) -> None:
        """Raises FloatingPointError if any process saw a non-finite loss among `losses` ((step, loss) since the last
        log) or holds non-finite adapter weights. One host sync per call, not per step (a per-step `.item()` would
        stall the GPU queue); a collective decision, so every process raises together instead of some waiting."""
        acc = self.accelerator
        values = torch.stack([v.float() for _, v in losses]) if losses else torch.zeros(1, device=acc.device)
        # the trainable tensors as the optimizer holds them (under FSDP: its flat shards, not the adapter's attributes)
        trained = [torch.isfinite(p).all() for group in self.optimizer.param_groups for p in group["params"]]
        weights = torch.stack(trained).all() if trained else torch.ones((), dtype=torch.bool, device=acc.device)
        ok = torch.stack([torch.isfinite(values).all(), weights]).float()[None]  # (1, 2)
        flags = acc.gather(ok).amin(dim=0)  # (2,): 1 where every process is fine
        if bool(flags.all()):
            return
        bad = [(step, v.item()) for step, v in losses if not math.isfinite(v.item())]
        where = f"loss became {bad[0][1]} at step {bad[0][0]}" if bad else (
            "a loss became non-finite on another process" if not flags[0] else "the adapter weights became non-finite")
        raise FloatingPointError(f"{where}; lower --learning-rate (checkpoints written before it are intact)")

    def data_places(self) -> list[list[int]]:
        """Every process's [epoch, position, skipped], gathered (a collective: every process calls it)."""
        acc = self.accelerator
        mine = torch.tensor([[self.epoch, self.position, self.skipped]], dtype=torch.long, device=acc.device)
        return (acc.gather(mine) if acc.num_processes > 1 else mine).tolist()

    def save(self, losses: list[tuple[int, torch.Tensor]] = ()) -> Path | None:
        self.check_finite(list(losses))  # never write a checkpoint with non-finite weights
        self.accelerator.wait_for_everyone()
        ranks = self.data_places()
        shards, values = None, None
        if self.deepspeed:  # collectives: every process takes part
            shards = sharded.gather_shards(self.optimizer, self.accelerator)
            values = sharded.full_precision_state(self.accelerator.unwrap_model(self.module).adapter)
        path = None
        if self.accelerator.is_main_process:
            adapter = self.accelerator.unwrap_model(self.module).adapter
            path = save_checkpoint(self.output, self.step, adapter, self.state(shards, ranks), self.cfg.to_json(),
                                   self.cfg.keep_last, adapter_values=values)  # fmt: skip
        self.accelerator.wait_for_everyone()
        return path

    def run(self) -> Path:
        """Trains to `max_steps`; returns the final checkpoint folder.

        Once the loop runs, SIGINT (Ctrl-C) or SIGTERM (a scheduler's preemption, `scancel`, a launcher stopping its
        workers) stops it at the end of a step with a checkpoint, then raises `TrainingInterrupted`; a second Ctrl-C
        stops at once. Before (loading models, building the cache) they act as usual: there is nothing to save yet.
        """
        self.setup()
        if self.resume_from is not None and self.accelerator.is_main_process:
            for moved in set_aside_later(self.output, self.step):  # a new course of the run from an older checkpoint
                print(f"resuming from step {self.step}: the later {moved.name.split('-', 2)[2]} of the earlier course "
                      f"is kept as {moved}", file=sys.stderr)  # fmt: skip
        self.accelerator.wait_for_everyone()
        previous = self._catch_signals()
        benchmark = torch.backends.cudnn.benchmark  # a process-wide switch: set for the run only
        if self.cfg.cudnn_benchmark:
            torch.backends.cudnn.benchmark = True
        try:
            return self._loop()
        finally:
            torch.backends.cudnn.benchmark = benchmark
            # the loader's workers end with the run, also when it raises (TrainingInterrupted, a non-finite loss):
            # the exception's traceback holds the loop's frame, which kept them alive as long as it was held (a
            # notebook keeps the last one; a caller may store it)
            batches, self._batches = getattr(self, "_batches", None), None
            if batches is not None:
                batches.close()
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    # ---- interruption -------------------------------------------------------------------------------------------
    def _catch_signals(self) -> dict:
        """Installs the stop-after-this-step handlers (main thread only: Python delivers signals there)."""
        self.stop_signal: int | None = None
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous = {}

        def handler(signum, frame) -> None:
            if self.stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
            self.stop_signal = signum
            print(f"\n{signal.Signals(signum).name}: stopping after this step with a checkpoint "
                  "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)  # fmt: skip

        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, handler)
        return previous

    def _stop_requested(self, at_log: bool) -> bool:
        """Whether to stop now. One process decides alone; several agree at log steps (a collective there, not at
        every step), so that all save the same step together even when only one was signalled."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return self.stop_signal is not None
        if not at_log:
            return False
        mine = torch.tensor([0 if self.stop_signal is None else int(self.stop_signal)], device=acc.device)
        signals = acc.gather(mine)
        if self.stop_signal is None and bool(signals.any()):
            self.stop_signal = int(signals[signals > 0][0])  # signalled elsewhere
        return self.stop_signal is not None

    def _loop(self) -> Path:
        from tqdm.auto import tqdm

        cfg, acc = self.cfg, self.accelerator
        if acc.is_main_process:
            self.output.mkdir(parents=True, exist_ok=True)
            (self.output / "train_config.json").write_text(cfg.to_json())
            if acc.log_with:
                acc.init_trackers("ipadapter", config={k: v for k, v in dataclasses.asdict(cfg).items() if not isinstance(v, dict)})
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not self.show_progress, desc="training")
        batches = self._batches = self.batches()  # closed by `run`
        seen, started, losses = 0, time.perf_counter(), []
        first_step, warm = self.step, None  # throughput is measured after two warm-up steps
        while self.step < cfg.max_steps:
            for micro in range(cfg.gradient_accumulation):
                batch = next(batches)
                self.skipped += batch["skipped"]
                since = self.epoch
                while "index" not in batch:  # every image of the batch was unreadable
                    if self.epoch - since >= 2:  # a whole pass over the data without one usable sample
                        raise ValueError(f"no usable sample in {cfg.data}: every image (or face embedding) failed to "
                                         f"load ({self.skipped} skipped); check the paths and --image-root")  # fmt: skip
                    batch = next(batches)
                    self.skipped += batch["skipped"]
                g = step_generator(cfg.seed, self.step * cfg.gradient_accumulation + micro, acc.process_index)
                kwargs, target, _ = self.inputs(batch, g)
                with acc.accumulate(self.module):
                    with self.autocast():
                        pred = self.module(**kwargs)
                    loss = F.mse_loss(pred.float(), target.float())
                    acc.backward(loss)  # under DeepSpeed also the optimizer step (clipping included) at the last micro-batch
                    if acc.sync_gradients and cfg.max_grad_norm and not self.deepspeed:
                        acc.clip_grad_norm_(self.module.parameters(), cfg.max_grad_norm)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                losses.append((self.step + 1, loss.detach()))  # checked at the next log or save
                seen += len(batch["index"]) * acc.num_processes
            self.lr_scheduler.step()
            self.step += 1
            bar.update(1)
            if self.step - first_step == 2:
                if acc.device.type == "cuda":  # the clock starts once the warm-up steps have run, not when queued
                    torch.cuda.synchronize(acc.device)
                warm = (time.perf_counter(), seen)
            if self.step < cfg.max_steps and self._stop_requested(at_log=self.step % cfg.log_every == 0):
                final = self.save(losses) or self.output / f"checkpoint-{self.step}"  # (written by the main process)
                bar.close()
                if acc.log_with:
                    acc.end_training()  # the trackers' last scalars reach the disk
                self.adapter.detach()
                raise TrainingInterrupted(self.stop_signal, self.step, final)  # type: ignore[arg-type]
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                self.check_finite(losses)
                mean_loss = acc.gather(torch.stack([v for _, v in losses]).mean()[None]).mean().item()
                rate = seen / max(time.perf_counter() - started, 1e-9)
                bar.set_postfix(loss=f"{mean_loss:.4f}", samples_per_s=f"{rate:.1f}", skipped=self.skipped)
                if acc.log_with:
                    acc.log({"loss": mean_loss, "samples_per_s": rate, "lr": self.lr_scheduler.get_last_lr()[0]}, step=self.step)
                losses = []
            # the checkpoint first: a validation that fails (out of memory, a pipeline error) loses no step
            if self.step % cfg.save_every == 0 and self.step < cfg.max_steps:
                self.save(losses)
            if cfg.validate_every and self.step % cfg.validate_every == 0 and self.step < cfg.max_steps \
                    and acc.is_main_process:  # fmt: skip
                self.validate()
        bar.close()
        now = time.perf_counter()
        self.loop_seconds = now - started
        if warm is not None and now > warm[0] and seen > warm[1]:
            self.samples_per_second = (seen - warm[1]) / (now - warm[0])
        else:
            self.samples_per_second = seen / max(self.loop_seconds, 1e-9)
        final = self.save(losses)
        if cfg.validate_every and self.step % cfg.validate_every == 0 and acc.is_main_process:  # after the save
            self.validate()
        if acc.log_with:
            acc.end_training()
        self.adapter.detach()
        return final if final is not None else self.output / f"checkpoint-{self.step}"

    # ---- validation ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> float | None:
        """Generates from the fixed validation references; logs mean CLIP image similarity (generated vs reference)."""
        from .validation import validate

        score = validate(self, self.validation_records)
        if score is not None and self.accelerator.log_with:
            self.accelerator.log({"validation/clip_i": score}, step=self.step)
        return score


def _digest(value) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(value).encode()).hexdigest()[:16]


def records_digest(records) -> str:
    """What the cache was built from: each record's key (its image's name as the data gives it), caption, face
    embedding's file name, and the sizes in bytes of both files (another list or caption changes it, and so does an
    image or embedding replaced in place by one of another size; one of exactly the same size is not detected).
    Names and sizes, not absolute paths or modification times: a dataset copied or moved elsewhere keeps its cache."""
    import hashlib

    def size(path: str) -> int | None:
        try:
            return Path(path).stat().st_size if path else None
        except OSError:  # missing or unreadable: the record is skipped (and counted) when the cache is built
            return None

    digest = hashlib.sha256()
    for r in records:
        # the record's key (its image as the data names it), not where the data lies on this disk
        source = "" if r.image_path else f"<{len(r.image_bytes)} bytes {hashlib.sha256(r.image_bytes).hexdigest()[:16]}>"
        face = Path(r.face_id_path).name if r.face_id_path else ""
        digest.update(json.dumps([r.key, r.text, source, size(r.image_path), face, size(r.face_id_path)]).encode())
    return digest.hexdigest()


def collate_cached(items: list[dict]) -> dict:
    batch = {"skipped": 0}
    for key in items[0]:
        values = [i[key] for i in items]
        batch[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else torch.tensor(values)
    return batch


def train(cfg: TrainConfig, show_progress: bool = True) -> Path:
    """Runs `cfg`; returns the final checkpoint folder."""
    return Trainer(cfg, show_progress).run()


def parse_bool(text: str) -> bool:
    """true/false, yes/no, 1/0 (any case); anything else is refused rather than read as false."""
    value = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected true or false, found {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ipadapter train",
        description="Train an IP-Adapter with the paper's recipe (use `accelerate launch -m ipadapter.train` for several processes).",
    )
    helps = field_help()
    parser.add_argument("--config", help="a JSON file of TrainConfig fields (command-line flags override it)")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "extra":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        if isinstance(default, bool):
            parser.add_argument(flag, type=parse_bool, default=None, metavar="BOOL",
                                help=f"{helps.get(f.name, '')} (default: {default})")
        else:
            parser.add_argument(flag, type=type(default), default=None, help=f"{helps.get(f.name, '')} (default: {default!r})")
    return parser


def config_from_args(argv: Sequence[str] | None) -> TrainConfig:
    args = build_parser().parse_args(argv)
    base = {}
    if args.config:
        if not Path(args.config).is_file():
            raise FileNotFoundError(f"--config file not found: {args.config}")
        try:
            base = json.loads(Path(args.config).read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"--config {args.config}: not valid JSON ({error.msg} at line {error.lineno})") from error
        if not isinstance(base, dict):
            raise ValueError(f"--config {args.config}: expected a JSON object of TrainConfig fields")
        unknown = sorted(set(base) - {f.name for f in dataclasses.fields(TrainConfig)})
        if unknown:
            raise ValueError(f"--config {args.config}: unknown TrainConfig fields {unknown}")
    overrides = {k: v for k, v in vars(args).items() if k != "config" and v is not None}
    return TrainConfig(**{**base, **overrides})


def main(argv: Sequence[str] | None = None) -> int:
    cfg = None
    try:
        cfg = config_from_args(argv)
        final = train(cfg)
    except (ValueError, OSError, ImportError) as e:  # OSError: missing files, hub ids that cannot be fetched
        models = {"--base": cfg.base, "--image-encoder": cfg.image_encoder} if cfg is not None else {}
        print(f"error: {error_line(e, models)}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # a diverging run: its message names the last finite checkpoint
        print(f"error: {e}", file=sys.stderr)
        return 1
    except TrainingInterrupted as e:
        import os

        if int(os.environ.get("RANK", "0")) == 0:
            print(e, file=sys.stderr)
        return 128 + e.signum  # the shell's convention for a process ended by a signal
    import os

    if int(os.environ.get("RANK", "0")) == 0:  # one line, from the process that wrote the checkpoint
        print(f"final checkpoint: {final} (use it directly, or `ipadapter convert {final}/adapter.safetensors out.bin "
              "--to official`)")  # fmt: skip
    return 0
