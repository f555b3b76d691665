"""The training loop of paper section 5, resumable bit for bit.

SGD with momentum and weight decay; torch's update `v <- m v + (g + wd w); w <- w - lr v`
is the paper's `v <- m v - wd lr w - lr g; w <- w + v` with the velocity scaled by -1/lr:
the same trajectory while the rate is constant; at a rate drop `drop_rate` rescales
torch's velocity so that the paper's carries the old rate on (`train.velocity`).

Every random choice of step s of epoch e (the batch order, the crops, flips and
lighting, dropout) comes from seeds derived from (seed, e, s), not from a generator's
running state, so a run resumed from a checkpoint draws exactly what an uninterrupted run
draws. Checkpoints (at every epoch end, and at the first loss read `checkpoint_minutes`
after the last one: minutes, as a checkpoint's cost is the same on any device) are
written atomically, synced to the disk. A checkpoint made for other parameters or data,
or past this run's epoch budget, is set aside (`NAME.other-run-RUN.pt`, a file per
run), not resumed nor overwritten, and comes back when its run does (params edited,
then the edit undone); one of a run given more epochs continues it (its draws do not depend on the
budget, nor does the schedule). One made by other training code
(`digests.training_code()`) is resumed with a warning naming the changed files when it
is unfinished (a run that crashed on a bug goes on after the fix), and set aside and
trained again when it is finished: `dvc repro` reruns the stage
because the code changed, and the model must then be the new code's.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict

from alexnet.atomic import file_target, output_folder
from alexnet.augment import Augment, Draws
from alexnet.crops import centre_crop
from alexnet.digests import (
    changed_code,
    code_digests,
    file_digest,
    recipe_changes,
    with_defaults,
)
from alexnet.distributed import World
from alexnet.errors import AlexnetError, Interrupted, one_line, user_line
from alexnet.jpeg import decode_threads, to_device
from alexnet.lmdb_store import read_meta
from alexnet.metrics import label_ranks, missed
from alexnet.model import AlexNet
from alexnet.modelfile import check_replaceable, save_model, save_tensors
from alexnet.params import DEFAULTS, JpegDecoder, Kernels, ModelParams, TrainParams
from alexnet.placement import TwoColumnAlexNet, check_devices, place, resolve_devices
from alexnet.reader import LmdbSplit, batch_loader, check_together, encoded_for, in_order, read
from alexnet.schedule import PlateauSchedule
from alexnet.shards import SPLITS
from alexnet.stats import MEAN_FILE, PCA_FILE, load_stats
from alexnet.train_files import SUMMARY

# Params a checkpoint is resumed across, besides how the run is executed: the epoch
# budget. Every draw comes from (seed, epoch, step) and the schedule does not read it, so
# a run given more epochs is the same run, longer (one given fewer than its checkpoint
# has trained is not: the checkpoint's weights are later ones).
BUDGET = frozenset({"epochs"})


class TrainError(AlexnetError):
    """Training cannot start or go on (missing data, class mismatch, divergence...)."""


class EveryRankError(TrainError):
    """A `TrainError` that every rank raises alike, from what they found together (a sum
    or a gather over the ranks, or the weights they share): each node's first rank says
    it (`alexnet.fit.main`), not each of its 8 ranks."""


class TrainRun(BaseModel):
    """One training run: the validated params sections as params.yaml gives them, and
    the paths the train stage reads and writes. torchrun ranks receive it as JSON and
    validate it again with the same classes."""

    model_config = ConfigDict(frozen=True)

    train: TrainParams
    model: ModelParams
    image: dict  # params prepare.image_options(): recorded in the model file for predict
    kernels: Kernels  # params compute.kernels
    jpeg_decoder: JpegDecoder = DEFAULTS.compute.jpeg_decoder  # params compute.jpeg_decoder
    lmdb: Path  # train/ and val/ stores
    stats: Path  # mean.npy, pca.json
    model_path: Path
    checkpoint: Path
    metrics: Path  # train.json and the dvclive folder train/ go here

    def params(self) -> dict:
        """The params sections this run was given, as params.yaml writes them (what
        dvclive records beside the curves)."""
        return {
            "train": self.train.model_dump(mode="json"),
            "model": self.model.model_dump(mode="json"),
            "prepare": self.image,
            "compute": {"kernels": self.kernels, "jpeg_decoder": self.jpeg_decoder},
        }


# derived_seed(step's seed, DROPOUT_STREAM, rank): the dropout masks' seed, apart from
# the augmentation's (the step's seed itself)
DROPOUT_STREAM = 1


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across runs and platforms."""
    digest = hashlib.sha256(json.dumps(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def epoch_order(count: int, seed: int, epoch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(derived_seed(seed, epoch, -1))
    return torch.randperm(count, generator=generator)


class EpochBatches(torch.utils.data.Dataset):
    """Item (epoch, step): this rank's rows of global batch `step` of `epoch` (uint8, in
    channels-last layout, or JPEG payloads left `encoded` for a GPU to decode), their
    labels, and the global batch's size. Workers compute the epoch's order themselves,
    so one persistent loader streams across epochs."""

    def __init__(
        self, split: LmdbSplit, seed: int, batch_size: int, rows: slice, encoded: bool = False
    ):
        self.split, self.seed, self.batch_size, self.rows = split, seed, batch_size, rows
        self.encoded = encoded
        self._order: tuple[int, torch.Tensor] | None = None

    def order(self, epoch: int) -> torch.Tensor:
        if self._order is None or self._order[0] != epoch:
            self._order = epoch, epoch_order(len(self.split), self.seed, epoch)
        return self._order[1]

    def __getitem__(self, key: tuple[int, int]):
        epoch, step = key
        batch = self.order(epoch)[step * self.batch_size : (step + 1) * self.batch_size]
        images, labels = read(self.split, batch[self.rows], self.encoded)
        return images, labels, len(batch)


class Steps(Sequence[tuple[int, int]]):
    """The (epoch, step) keys from (`epoch`, `step`) to the end of an `epochs` budget of
    `steps` steps each, made when asked for: a list of them is 86 MB on ImageNet (90
    epochs of 10,010 steps), in every rank."""

    def __init__(self, epoch: int, step: int, epochs: int, steps: int):
        self.first, self.steps = epoch * steps + step, steps
        self.count = max(epochs * steps - self.first, 0)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[int, int]:
        if not 0 <= index < self.count:
            raise IndexError(index)
        return divmod(self.first + index, self.steps)


@torch.no_grad()
def validate(
    model,
    store: LmdbSplit,
    mean: torch.Tensor,
    crop: int,
    batch: int,
    device,
    world: World = World(),
    decoder: JpegDecoder = DEFAULTS.compute.jpeg_decoder,
) -> dict:
    """Centre-crop loss and top-1 / top-5 error on a whole split (each rank evaluates
    its share of the batches; the sums are added over ranks; a jpeg store's batches
    decoded on a CUDA device by `decoder`)."""
    model.eval()
    # loss, top-1 and top-5 mistakes, summed on the device in float64 (the float32
    # losses added in order, exactly as on the host) and read once at the end
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    batches = in_order(store, batch, world.rows, encoded_for(store, device, decoder))
    loader = batch_loader(batches, range(len(batches)), pin_memory=device.type == "cuda")
    for images, labels in loader:
        images = to_device(images, device, store.shape, decoder)
        labels = labels.to(device, non_blocking=True)  # pinned: no wait for the last forward
        logits = model(centre_crop(images, mean, crop))
        rank = label_ranks(logits, labels)
        loss = F.cross_entropy(logits.float(), labels, reduction="sum")
        totals += torch.stack([loss.double(), missed(rank, 1).sum(), missed(rank, 5).sum()])
    loss, top1, top5 = world.sum(totals.tolist())
    n = len(store)
    return {"val_loss": loss / n, "val_top1_error": top1 / n, "val_top5_error": top5 / n}


# How a rank starts (`start_view`'s first number): it could not read the checkpoint (an
# I/O error: then every rank stops, the file kept)
AFRESH, RESUMES, UNREADABLE = 0, 1, 2


@dataclass(frozen=True)
class NotResumed:
    """Why `Trainer._load` does not resume the checkpoint there (`why` follows its path),
    and what becomes of it: `set_aside` for good (`digest`: the run it holds, None where
    it is damaged), or kept in place where it could not be read now (an I/O error, which
    says nothing of the file)."""

    why: str
    set_aside: bool = True
    digest: str | None = None


def set_aside_path(checkpoint: Path, digest: str | None) -> Path:
    """Where a checkpoint that is not resumed goes: a file per run (params and data),
    so that none replaces another's and a run whose params come back finds its own
    (`Trainer.resume`); the damaged ones share one."""
    return checkpoint.with_stem(f"{checkpoint.stem}.other-run-{(digest or 'damaged')[:12]}")


def set_aside_note(checkpoint: Path) -> str:
    """What the checkpoints set aside beside `checkpoint` add up to, where there are two or
    more: none is removed (a run whose params come back resumes its own), and each is as
    large as the checkpoint (~0.5 GB on ImageNet), so the user is told."""
    pattern = f"{glob.escape(checkpoint.stem)}.other-run-*{glob.escape(checkpoint.suffix)}"
    sizes = []
    for path in checkpoint.parent.glob(pattern):
        with suppress(OSError):  # (removed meanwhile: not counted)
            sizes.append(path.stat().st_size)
    if len(sizes) < 2:
        return ""
    held = sum(sizes)
    amount = f"{held / 1e9:.1f} GB" if held >= 1e9 else f"{held / 1e6:.0f} MB"
    return (
        f" ({len(sizes)} set aside there hold {amount}: remove those of runs you will not "
        "come back to)"
    )


def start_view(start: int, epoch: int, step: int, run: str, code: dict[str, str]) -> list[int]:
    """Where a rank starts, as integers the ranks gather: how (`AFRESH`, `RESUMES`,
    `UNREADABLE`), the epoch and step, and 60-bit prefixes of the run's digest (params,
    data) and its code's."""
    code_digest = hashlib.sha256(json.dumps(code, sort_keys=True).encode()).hexdigest()
    return [int(start), epoch, step, int(run[:15], 16), int(code_digest[:15], 16)]


def disagreement(views: list[list[int]]) -> str | None:
    """One line saying how the ranks' `start_view`s differ from rank 0's; None if they
    do not."""
    differ = [rank for rank, view in enumerate(views) if view != views[0]]
    if not differ:
        return None
    more = f" ({len(differ) - 1} more ranks differ)" if len(differ) > 1 else ""
    return (
        f"the ranks do not agree where training starts: rank 0 {_start(views[0])}, rank "
        f"{differ[0]} {_start(views[differ[0]])}{more}; every node must see the same "
        "checkpoint, data and code"
    )


def _start(view: list[int]) -> str:
    start, epoch, step, run, code = view
    where = {
        AFRESH: "starts afresh",
        RESUMES: f"resumes epoch {epoch + 1}, step {step}",
        UNREADABLE: "cannot read it",
    }[start]
    return f"{where} (run {run:015x}, code {code:015x})"


def check_outputs(model_path: Path, checkpoint: Path, metrics: Path) -> None:
    """The files train writes, checked before any work."""
    check_replaceable(file_target(model_path))
    file_target(checkpoint)
    output_folder(metrics)
    file_target(metrics / SUMMARY)
    if model_path.resolve() == checkpoint.resolve():
        raise TrainError(
            f"{model_path}: named as both the model file and the checkpoint; name two files"
        )


# What rank 0 found of the checkpoint's lock (`sole_writer`), summed over the ranks
TAKEN, IN_USE, UNLOCKABLE = 0, 1, 2
# A file system that cannot lock (NFS without its lock daemon): trained without one
NO_LOCKS = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS})


@contextmanager
def sole_writer(
    checkpoint: Path, world: World = World(), log: Callable[[str], None] = print
) -> Iterator[None]:
    """Hold `checkpoint`'s lock (`NAME.lock` beside it; rank 0, which writes it) while
    inside: a second training given the same file (at another terminal; another
    repository's run on a worker whose ALEXNET_CHECKPOINT names it) would set this one's
    aside, or be set aside, at every save. It is refused in one line instead, by every
    rank alike (a sum, which every rank reaches whatever rank 0 met: the others would
    wait for it in their first collective). (flock: on NFS, a lock every node sees.)"""
    lock = checkpoint.with_name(f"{checkpoint.name}.lock")
    with ExitStack() as held:  # (closing the file lets go of the lock, however it ends)
        found, why = TAKEN, ""
        if world.main:
            try:
                lock.parent.mkdir(parents=True, exist_ok=True)
                fcntl.flock(held.enter_context(open(lock, "a")), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                found = IN_USE
            except OSError as error:
                if error.errno in NO_LOCKS:
                    log(
                        f"warning: {lock}: cannot be locked here ({user_line(error)}): a "
                        "second training given this checkpoint would not be refused"
                    )
                else:
                    found, why = UNLOCKABLE, user_line(error)
        found = int(world.sum([float(found)])[0])  # (rank 0's alone: the others add 0)
        if found == IN_USE:
            raise EveryRankError(
                f"{checkpoint}: another training is using this checkpoint now ({lock} is "
                "locked); wait for it to end, or give this one another --checkpoint"
            )
        if found == UNLOCKABLE:
            raise EveryRankError(
                f"{checkpoint}: its lock cannot be taken ({why or 'rank 0 says why'}); "
                "give this training another --checkpoint"
            )
        yield


class Trainer:
    """A training run's state (model, optimizer, schedule, position) and its loop. The
    params sections of `run` are used as they are; `world` is this process's rank."""

    def __init__(self, run: TrainRun, world: World = World()):
        p = run.train
        check_outputs(run.model_path, run.checkpoint, run.metrics)
        self.run, self.params, self.checkpoint, self.world = run, p, run.checkpoint, world
        self.devices = resolve_devices(world.device(p.device))
        self.device = self.devices[0]  # inputs, augmentation and logits live here
        # per loader process; validation reads in this process while they wait (a jpeg
        # store's decode on the host: with 8 workers, 2 of 16 cores decoded 50,000 images)
        self.train = LmdbSplit(run.lmdb / "train", decode_threads(p.loader_workers))
        self.val = LmdbSplit(run.lmdb / "val", decode_threads(0))
        check_together(self.train, self.val)
        for split, use in ((self.train, "train"), (self.val, "validate")):
            if not len(split):  # no step (a model file of nothing), or no error rate
                raise TrainError(f"{split.path}: no images to {use} on")
        self.classes = self.train.classes
        mean, self.pca = load_stats(run.stats)
        if mean.shape != self.train.shape:  # or every step fails on the mean's window
            raise TrainError(
                f"{run.stats}: the mean image is {tuple(mean.shape[1:])}, the store's images "
                f"{self.train.shape[1:]}; run stats on the data that was packed"
            )
        if not p.subtract_mean:  # the ablation: no mean wherever the model sees an image
            mean = torch.zeros_like(mean)  # (validation, and the model file's users)
        self.mean = mean.to(self.device)
        torch.manual_seed(p.seed)  # the initial weights
        network = AlexNet(
            **run.model.model_dump(), num_classes=len(self.classes), kernels=run.kernels
        )
        self.crop = network.input_size
        # `model` is the placed module whose weights are checkpointed; `net` runs the
        # steps (wrapped in DDP across processes).
        self.model = place(network, self.devices)
        if p.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.net = self.model
        if world.size > 1:
            ids = [self.device] if self.device.type == "cuda" and len(self.devices) == 1 else None
            self.net = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.memory_format = torch.channels_last if p.channels_last else torch.contiguous_format
        # fused: weight decay, momentum and the update in one pass over the 61M weights
        # (4 passes unfused, ~15% of a CPU step at batch 16); one device only.
        self.optimizer = torch.optim.SGD(
            decay_groups(self.model, p.weight_decay, p.decay_biases),
            lr=p.lr,
            momentum=p.momentum,
            fused=len(self.devices) == 1 or None,
        )
        # `train.compile`: the whole step as compiled graphs (augmentation, forward and
        # loss; their backward; the SGD update), on CUDA each replayed as a CUDA graph
        # ("reduce-overhead": one launch per graph, not one per kernel). One graph per
        # batch shape (the full batch and the epoch's last); a rate drop recompiles the
        # update, whose rate is a constant in it.
        self.forward, self.update = self._losses, self.optimizer.step
        if p.compile:
            self._make_momenta()
            mode = "reduce-overhead" if self.device.type == "cuda" else None
            self.forward = torch.compile(self._losses, dynamic=False, mode=mode)
            self.update = torch.compile(self.optimizer.step, dynamic=False, mode=mode)
        self.schedule = PlateauSchedule(
            lr_patience=p.lr_patience,
            lr_threshold=p.lr_threshold,
            max_lr_drops=p.max_lr_drops,
            stop_at_last_plateau=p.stop_at_last_plateau,
            max_epochs_per_rate=p.max_epochs_per_rate,
        )
        eigen = torch.tensor(self.pca["eigenvalues"]), torch.tensor(self.pca["eigenvectors"])
        self.augment = Augment(
            mean,
            *eigen,
            crop=self.crop,
            flip=p.flip,
            random_crop=p.random_crop,
            lighting=p.lighting,
            lighting_scale=p.lighting_scale,
            subtract_mean=p.subtract_mean,
            kernels=run.kernels,
        ).to(self.device)
        # Hashes the data: minutes on ImageNet, and uneven across ranks (digests the memo
        # knows), so the ranks meet at patient barriers after it.
        self.recipe = world.node_first(self._recipe)
        self.digest = hashlib.sha256(json.dumps(self.recipe, sort_keys=True).encode()).hexdigest()
        self.code = code_digests()
        self.epoch, self.step, self.history = 0, 0, []
        self.running = self._fresh_totals()  # of the current epoch, checkpointed with it
        # Steps whose loss and mistakes are still on the device: (loss, wrong, images,
        # step). Read together every `sync_every` steps, so the host queues the next
        # steps instead of waiting for each; never left unread at a checkpoint.
        self.unread: list[tuple[torch.Tensor, torch.Tensor, int, int]] = []
        self.stop_requested = False
        self.saved_at = time.monotonic()  # the clock of `checkpoint_minutes`
        self._stream = None  # the training batches, from the current step to the last epoch

    def _make_momenta(self) -> None:
        """The momentum buffers, made now as zeros, for a compiled update. torch makes
        each at the first step (a copy of the gradient; `0.9 * 0 + g` is the same number),
        but a compiled update would make them inside its first CUDA-graph run, in the
        graphs' memory pool, and the next step's graphs free that pool's live outputs:
        the momenta would be lost. Made here they are plain tensors, as a resumed run's
        are. (An eager run keeps torch's way: zeros cost a pass over fresh memory.)"""
        if not self.params.momentum:
            return
        for group in self.optimizer.param_groups:
            for weight in group["params"]:
                self.optimizer.state[weight]["momentum_buffer"] = torch.zeros_like(weight)

    def _recipe(self) -> dict:
        """What this run computes: its params (less how it is executed, and its epoch
        budget) and the digests of its data. A checkpoint records it."""
        run = self.run
        memo = self.checkpoint.with_name(f"{self.checkpoint.name}.data-digests.json")
        data = {
            "lmdb/train": run.lmdb / "train" / "data.mdb",
            "lmdb/val": run.lmdb / "val" / "data.mdb",
            "stats/mean": run.stats / MEAN_FILE,
            "stats/pca": run.stats / PCA_FILE,  # the lighting's eigenvectors
        }
        given = run.params()
        return {
            "train": run.train.model_dump(mode="json", exclude=TrainParams.EXECUTION_KEYS | BUDGET),
            "model": given["model"],
            "compute": given["compute"],
            "data": {name: file_digest(path, memo) for name, path in data.items()},
        }

    @staticmethod
    def _fresh_totals() -> dict:
        return {"loss": 0.0, "wrong": 0, "seen": 0, "seconds": 0.0}

    # -- checkpoints -------------------------------------------------------------------
    def save(self) -> None:
        self._check_weights()  # on every rank: their weights are the same
        self.saved_at = time.monotonic()  # (a write's second or so is noise to minutes)
        if not self.world.main:
            return
        state = {
            "digest": self.digest,
            "recipe": self.recipe,
            "code": self.code,
            "epoch": self.epoch,
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "optimized": optimized(self.model, self.optimizer),  # what its momenta are of
            "schedule": self.schedule.state_dict(),
            "history": self.history,
            "running": self.running,
        }
        save_tensors(state, self.checkpoint)

    def _check_weights(self) -> None:
        """Raise where a weight or a momentum is not finite, before it is saved: the
        losses read so far were computed before their steps' updates, so an update that
        overflowed (a finite loss, an infinite gradient) would otherwise be checkpointed,
        and every resume would start from it."""
        momenta = (v for state in self.optimizer.state.values() for v in state.values())
        tensors = chain(self.model.parameters(), (v for v in momenta if torch.is_tensor(v)))
        # A tensor is finite where its least and greatest values are (both NaN where it
        # holds one): a reduction, where `isfinite` made a mask and an `abs` copy of
        # every tensor (~300 MB of fresh memory a checkpoint, 12% of a short CPU run).
        # One wait for the device(s), not one per tensor: the pairs are gathered on the
        # first weight's device.
        ends = [torch.stack(value.detach().aminmax()).float() for value in tensors]
        if bool(torch.cat([pair.to(ends[0].device) for pair in ends]).isfinite().all()):
            return
        where = f"epoch {self.epoch + 1}, step {self.step}"
        if self.step == 0 and self.epoch > 0:
            where = f"the end of epoch {self.epoch}"
        raise EveryRankError(
            f"a weight or its momentum is not finite after {where}: training diverged; "
            "lower train.lr or use another model.init"
        )

    def resume(self, log: Callable[[str], None] = lambda line: None) -> bool:
        """Load the checkpoint if it belongs to this run; returns whether it did. One
        that does not is set aside, not overwritten (`log` hears why, and where it
        went), and this run's own, set aside by an earlier run (params changed, then
        changed back), comes back. One of these params and data made by other code is
        trained again if it finished, resumed with a warning if not. Every rank decides
        alike, or all raise `TrainError`."""
        resumed, set_aside = self._resume(log)
        if resumed:  # (every rank alike: `_resume` checks)
            return True
        # not one it has just set aside as unfit for this run (past its budget, say)
        return self._bring_back(log, set_aside != self.digest) and self._resume(log)[0]

    def _resume(self, log: Callable[[str], None]) -> tuple[bool, str | None]:
        """(whether it resumed, the run of the checkpoint it set aside instead, if any)."""
        unused = self._load()
        if isinstance(unused, list):  # resumed, with these warnings
            for line in unused:
                log(line)
        # Each rank reads the checkpoint itself: one that saw a stale copy (NFS) or runs
        # another checkout would start elsewhere, so run other collectives (a hang) or,
        # from the same step, train other weights without a word.
        resumed = isinstance(unused, list)
        unreadable = isinstance(unused, NotResumed) and not unused.set_aside
        start = UNREADABLE if unreadable else int(resumed)
        mine = start_view(start, self.epoch, self.step, self.digest, self.code)
        if problem := disagreement(self.world.gather(mine)):
            raise EveryRankError(f"{self.checkpoint}: {problem}")
        if unreadable:  # on every rank alike (else the line above)
            raise EveryRankError(f"{self.checkpoint}: {unused.why}")
        if isinstance(unused, NotResumed) and self.world.main:
            aside, own = (set_aside_path(self.checkpoint, d) for d in (unused.digest, self.digest))
            fate = self._set_aside(aside, unused.digest is not None)
            then = "" if own.exists() and own != aside else "starting afresh; "  # `_bring_back`
            log(f"warning: {self.checkpoint} {unused.why}: {then}the checkpoint is {fate}")
            return resumed, unused.digest
        return resumed, None

    def _set_aside(self, aside: Path, one_run: bool) -> str:
        """Move the checkpoint to `aside`; what became of it. Where `aside` holds one of
        the same run (`one_run`: params and data; its draws do not depend on the budget,
        so the less trained is the other's past), the further trained stays there."""
        if one_run and aside.exists() and _progress(aside) >= _progress(self.checkpoint):
            self.checkpoint.unlink()
            return f"dropped: {aside} holds the same run, as far or further trained"
        os.replace(self.checkpoint, aside)
        return f"kept as {aside}{set_aside_note(self.checkpoint)}"

    def _bring_back(self, log: Callable[[str], None], allowed: bool) -> bool:
        """Put this run's checkpoint back where an earlier run set it aside, if `allowed`
        and the place is free; returns whether it did (rank 0 decides, for every rank).
        (On NFS another node's rank may not see the file at once: the ranks then
        disagree, in one line, and the next run resumes.)"""
        back = set_aside_path(self.checkpoint, self.digest)
        bring = allowed and self.world.main and back.exists() and not self.checkpoint.exists()
        if bring:
            os.replace(back, self.checkpoint)
            log(f"{self.checkpoint}: this run's own, set aside by an earlier run, back from {back}")
        return self.world.sum([float(bring)])[0] > 0  # (after the rename: a collective)

    def _load(self) -> list[str] | NotResumed | None:
        """`resume` on this rank alone: the warnings of a resumed checkpoint, or why the
        one there is not resumed (None: there is none)."""
        try:
            if not self.checkpoint.exists():  # (a stat can fail too: ESTALE, EIO)
                return None
            # on the host: a GPU a leftover process still holds must not make it "damaged"
            state = torch.load(self.checkpoint, map_location="cpu", weights_only=True)
        except OSError as error:  # unreadable now (EIO, a stale NFS handle): maybe whole
            return NotResumed(
                f"cannot be read ({one_line(error)}); it is kept: run again once it can "
                "be, or remove it to start afresh",
                set_aside=False,
            )
        except Exception as error:  # a damaged checkpoint is only a lost shortcut
            if _out_of_memory(error):  # this host's trouble, not the file's: kept
                raise
            return NotResumed(f"is damaged ({type(error).__name__})")
        if not isinstance(state, dict):
            return NotResumed("is damaged (not a checkpoint)")
        if "optimizer" not in state:  # a model file, say: the user's, not to overwrite
            raise TrainError(
                f"{self.checkpoint}: a file of torch tensors that is not a training "
                "checkpoint (a model file?); name another --checkpoint, or remove it"
            )
        digest = state.get("digest")
        digest = digest if isinstance(digest, str) else None  # (a file's, whatever it holds)
        # (a digest of the same recipe less params added since: resumed, its next save
        # recording this run's digest)
        recorded = with_defaults(state.get("recipe"), self.recipe, DEFAULTS.model_dump(mode="json"))
        if digest != self.digest and recorded != self.recipe:
            changes = recipe_changes(recorded, self.recipe)
            return NotResumed(f"is another run's ({changes})", digest=digest)
        if (state["epoch"], state["step"]) > (self.params.epochs, 0):
            done = f"{state['epoch']} epochs" + (
                f" and {state['step']} steps" * bool(state["step"])
            )
            return NotResumed(
                f"has trained {done}, past this run's {self.params.epochs}", digest=digest
            )
        warnings = []
        if changed := changed_code(state.get("code"), self.code):
            files = ", ".join(changed)
            if self._ends(state["epoch"], state["schedule"]["stopped"]):
                why = f"holds a finished run of other training code ({files} changed)"
                return NotResumed(why, digest=digest)
            warnings.append(
                f"warning: resuming a run begun by other training code ({files} changed); "
                f"delete {self.checkpoint} to start afresh"
            )
        if misfit := misfits(self.model, self.optimizer, state):
            return NotResumed(f"does not fit this training code ({misfit})", digest=digest)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.epoch, self.step, self.history = state["epoch"], state["step"], state["history"]
        self.running = state["running"]
        return warnings

    # -- the loop ----------------------------------------------------------------------
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.train) / self.params.batch_size)

    def batches(self):
        """This rank's training batches from the current step to the end of the epoch
        budget, read ahead by `loader_workers` processes that persist across epochs."""
        if self._stream is None:
            keys = Steps(self.epoch, self.step, self.params.epochs, self.steps_per_epoch())
            dataset = EpochBatches(
                self.train,
                self.params.seed,
                self.params.batch_size,
                self.world.rows,
                encoded_for(self.train, self.device, self.run.jpeg_decoder),
            )
            self._stream = iter(
                batch_loader(
                    dataset, keys, self.params.loader_workers, pin_memory=self.device.type == "cuda"
                )
            )
        return self._stream

    def _seed_dropout(self, seed: int) -> None:
        """Seed the generators dropout draws from: a stream apart from the augmentation's,
        one per rank (rank 0's is a one-process run's), and on two devices one per column
        (`torch.manual_seed` gives every CUDA device the same seed: the columns' fc6 and
        fc7 halves, the same shape, drew the same masks)."""
        torch.manual_seed(seed)
        for column, device in enumerate(self.devices[1:], start=1):
            if device.type == "cuda":
                with torch.cuda.device(device):
                    torch.cuda.manual_seed(derived_seed(seed, column))

    def train_step(
        self, images: torch.Tensor, labels: torch.Tensor, global_size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One SGD step on this rank's rows of a global batch of `global_size` images.
        Returns the summed loss and the count of top-1 mistakes, as device tensors: the
        step queues its work and does not wait for the device."""
        seed = derived_seed(self.params.seed, self.epoch, self.step)
        self._seed_dropout(derived_seed(seed, DROPOUT_STREAM, self.world.rank))
        generator = torch.Generator(device=self.device).manual_seed(seed)
        # (a jpeg store's batch arrives encoded: its size is known once it is decoded)
        images = to_device(images, self.device, self.train.shape, self.run.jpeg_decoder)
        # Draws for the whole global batch, this rank's rows kept: the same crops, flips
        # and lighting per image whatever the number of processes.
        draws = self.augment.draw(global_size, *images.shape[-2:], generator, self.device)
        draws = draws.rows(self.world.rows)
        labels = labels.to(self.device, non_blocking=True)
        self.net.train()
        if self.params.compile:  # a new step for the CUDA graphs (its first call: ~1.4 s)
            torch.compiler.cudagraph_mark_step_begin()
        try:
            loss, wrong = self.forward(images, draws, labels)
            self.optimizer.zero_grad(set_to_none=True)
            # Sum over this rank's rows / global batch, times ranks: DDP's gradient mean
            # over ranks is then exactly the gradient of the global batch's mean loss.
            (loss * (self.world.size / global_size)).backward()
        except torch.OutOfMemoryError:
            raise TrainError(
                f"out of memory on {self.device} at batch size {global_size}; "
                "lower train.batch_size"
            ) from None
        self.update()
        # Copies: a CUDA graph's next replay overwrites its outputs, and these wait in
        # `unread` for up to `sync_every` steps.
        return loss.detach().clone(), wrong.clone()

    def _losses(
        self, images: torch.Tensor, draws: Draws, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's forward: the augmented batch through the network; the summed loss
        and the count of top-1 mistakes."""
        inputs = self.augment.apply(images, draws)
        inputs = inputs.contiguous(memory_format=self.memory_format)
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.params.amp):
            logits = self.net(inputs)
        loss = F.cross_entropy(logits.float(), labels, reduction="sum")
        return loss, missed(label_ranks(logits.detach().float(), labels), 1).sum()

    def _settle(self, stop: bool = False, due: bool = False) -> tuple[bool, bool]:
        """Reads the unread steps' losses and mistakes (one wait for the device, one sum
        over ranks), adds them to the epoch's totals in step order, as reading each step
        at once would, and returns whether any rank asked to stop, and whether any found
        a checkpoint `due`: every rank then saves (their clocks differ a little). A loss
        that is not finite stops the run, naming its step (the first such)."""
        losses = torch.stack([loss for loss, *_ in self.unread]).double()
        wrongs = torch.stack([wrong for _, wrong, *_ in self.unread]).double()
        # float32 losses and counts below 2**53 are exact in float64: the same numbers
        values = torch.cat([losses, wrongs]).cpu().tolist() + [float(stop), float(due)]
        *values, stop, due = self.world.sum(values)  # summed first: every rank acts alike
        steps, self.unread = self.unread, []
        totals = self.running
        for (_, _, size, step), loss, wrong in zip(
            steps, values[: len(steps)], values[len(steps) :], strict=True
        ):
            if not math.isfinite(loss):
                raise EveryRankError(
                    f"the loss became {loss} at epoch {self.epoch + 1}, step {step}: "
                    "training diverged; lower train.lr or use another model.init"
                )
            totals["loss"] += loss
            totals["wrong"] += int(wrong)
            totals["seen"] += size
        return bool(stop), bool(due)

    def run_epoch(self, on_step: Callable[[int, int], None] | None = None) -> dict:
        """The rest of the current epoch, then validation."""
        if self.step == 0 and self.epoch > 0 and self._stop_agreed():
            # asked during the last validation: its checkpoint is this very place (one
            # more step would be trained and saved for nothing)
            raise Interrupted(f"stopped at the end of epoch {self.epoch}")
        stream, totals = self.batches(), self.running
        started = time.perf_counter()
        while self.step < self.steps_per_epoch():
            images, labels, size = next(stream)
            outcome = self.train_step(images, labels, size)  # seeded by the step's number
            self.step += 1
            self.unread.append((*outcome, size, self.step))
            if on_step:
                on_step(self.step, self.steps_per_epoch())
            if not self._read_now():
                continue
            # (not at the epoch's last step: its end's checkpoint follows, after validation)
            due = self._checkpoint_due() and self.step < self.steps_per_epoch()
            stop, due = self._settle(self.stop_requested, due)  # waits for the device
            totals["seconds"] += time.perf_counter() - started
            if stop or due:
                self.save()
                if stop:  # every rank stops at the same step
                    raise Interrupted(f"stopped at epoch {self.epoch + 1}, step {self.step}")
            started = time.perf_counter()
        seen = max(totals["seen"], 1)
        record = {
            "epoch": self.epoch + 1,
            "lr": self.optimizer.param_groups[0]["lr"],
            "train_loss": totals["loss"] / seen,
            "train_top1_error": totals["wrong"] / seen,
            "images_per_s": totals["seen"] / max(totals["seconds"], 1e-9),
            **validate(
                self.model,
                self.val,
                self.mean,
                self.crop,
                self.params.val_batch_size,
                self.device,
                self.world,
                self.run.jpeg_decoder,
            ),
        }
        if self.schedule.step(record["val_top1_error"]):
            self.drop_rate()
        self.history.append(record)
        self.epoch, self.step, self.running = self.epoch + 1, 0, self._fresh_totals()
        self.save()
        if self.finished():  # the loader's worker processes end now, not when collected
            self._stream = None
        return record

    def drop_rate(self) -> None:
        """Divide the rate by 10. torch's velocity is the paper's divided by -lr: with
        `velocity: paper` it is multiplied by 10 too, so that the paper's velocity (in
        weight units, carrying the old rate) goes on unchanged: the next step is then
        `0.9 v - lr/10 (g + wd w)`, section 5's rule at the new rate."""
        for group in self.optimizer.param_groups:  # the rate's one home
            group["lr"] /= 10
            if self.params.velocity == "paper":
                for weight in group["params"]:
                    buffer = self.optimizer.state.get(weight, {}).get("momentum_buffer")
                    if buffer is not None:
                        buffer.mul_(10)

    def _stop_agreed(self) -> bool:
        """Whether any rank was asked to stop (a sum over the ranks: all stop alike)."""
        return self.world.sum([float(self.stop_requested)])[0] > 0

    def _checkpoint_due(self) -> bool:
        """Whether `checkpoint_minutes` have passed since the last checkpoint (or the
        run's start) on this rank's clock."""
        return time.monotonic() - self.saved_at >= 60 * self.params.checkpoint_minutes

    def _read_now(self) -> bool:
        """Whether to read the unread steps now: every `sync_every` steps, at the epoch's
        end, and, in a one-process run, as soon as a stop is asked (ranks learn of one
        rank's stop only at a read they all make)."""
        return (
            len(self.unread) >= self.params.sync_every
            or self.step == self.steps_per_epoch()
            or (self.stop_requested and self.world.size == 1)
        )

    def finished(self) -> bool:
        return self._ends(self.epoch, self.schedule.stopped)

    def _ends(self, epoch: int, stopped: bool) -> bool:
        """Whether a run at `epoch`, its schedule `stopped` or not, is over."""
        return epoch >= self.params.epochs or stopped

    def weights(self) -> dict[str, torch.Tensor]:
        """The weights in the one-device layout of `AlexNet`, on the CPU."""
        model = self.model
        two = isinstance(model, TwoColumnAlexNet)
        state = model.merged_state_dict() if two else model.state_dict()
        return {name: value.detach().cpu() for name, value in state.items()}

    def export(self, path: Path) -> None:
        """The model file (alexnet/modelfile.py): the weights and everything needed to
        use them; no timings, so identical runs give identical bytes."""
        contents = {
            "state_dict": self.weights(),
            "classes": self.classes,
            "model": {**self.run.model.model_dump(), "num_classes": len(self.classes)},
            "mean": self.mean.cpu(),
            "pca": {k: self.pca[k] for k in ("eigenvalues", "eigenvectors")},
            "prepare": self.run.image,
            "train": self.params.model_dump(mode="json", exclude=TrainParams.EXECUTION_KEYS),
            "digest": self.digest,
        }
        save_model(path, contents)


def _progress(checkpoint: Path) -> tuple[int, int]:
    """A checkpoint's (epoch, step), its tensors left on the disk (mmap); (-1, -1) where
    it cannot be read as one."""
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
        return int(state["epoch"]), int(state["step"])
    except Exception:  # damaged, or not a checkpoint: anything is further trained
        return -1, -1


def _out_of_memory(error: Exception) -> bool:
    """Whether `error` is the host's or a device's memory running out (torch's CPU
    allocator raises a RuntimeError saying so, not a MemoryError)."""
    if isinstance(error, MemoryError | torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "can't allocate memory" in str(error)


def misfits(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> str | None:
    """Why a checkpoint's weights and momenta cannot load into `model` and `optimizer`
    (other code renamed, added or resized a layer), found before anything is loaded:
    torch's `load_state_dict` copies every weight that fits before it raises on one that
    does not, which would leave a run that starts afresh half resumed."""
    mine, theirs = model.state_dict(), state["model"]
    if missing := sorted(mine.keys() - theirs.keys()):
        return f"it has no {missing[0]}"
    if unknown := sorted(theirs.keys() - mine.keys()):
        return f"it has a {unknown[0]} this model lacks"
    for name, value in mine.items():
        if (shape := tuple(theirs[name].shape)) != tuple(value.shape):
            return f"its {name} is {shape}, this model's {tuple(value.shape)}"
    groups = [len(group["params"]) for group in optimizer.param_groups]
    if [len(group["params"]) for group in state["optimizer"]["param_groups"]] != groups:
        return "its optimizer's parameter groups differ"
    # torch gives each momentum to the weight at its place in the groups, shape unchecked
    # (a layer registered in another order, its name kept, would get another's momenta)
    order = optimized(model, optimizer)
    if isinstance(theirs := state.get("optimized", order), list) and theirs != order:
        turn = next(i for i, (a, b) in enumerate(zip(theirs, order, strict=True)) if a != b)
        return f"its momentum of {theirs[turn]} is at {order[turn]}'s place"
    for index, momentum in state["optimizer"]["state"].items():
        weight = mine[order[index]] if index < len(order) else None
        buffer = momentum.get("momentum_buffer")
        if torch.is_tensor(buffer) and (weight is None or buffer.shape != weight.shape):
            return f"its momentum {index} does not fit this model's weights"
    return None


def optimized(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names of the optimizer's weights, in its order (a checkpoint's momenta's)."""
    names = {id(value): name for name, value in model.named_parameters()}
    return [names[id(value)] for group in optimizer.param_groups for value in group["params"]]


def decay_groups(model: torch.nn.Module, decay: float, biases: bool) -> list[dict]:
    """The optimizer's parameter groups: the weights decayed by `decay`, the biases too
    only if `biases` (params `train.decay_biases`)."""
    named = list(model.named_parameters())
    bias = [value for name, value in named if name.endswith("bias")]
    weights = [value for name, value in named if not name.endswith("bias")]
    return [
        {"params": weights, "weight_decay": decay},
        {"params": bias, "weight_decay": decay if biases else 0.0},
    ]


def load_history(checkpoint: Path) -> list[dict]:
    """The per-epoch records of the run in `checkpoint` (after a torchrun launch)."""
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["history"]


def refuse(
    lmdb: str,
    stats: str,
    model_path: str,
    checkpoint: str,
    metrics: str,
    train: TrainParams | None = None,
    **_: object,
) -> None:
    """What stops the stage before any work, as one line (`flows.stages.Stage.refusal`)."""
    if train is not None:
        check_devices("train.device", train.device)
    check_outputs(Path(model_path), Path(checkpoint), Path(metrics))
    load_stats(Path(stats))
    for split in SPLITS:
        read_meta(Path(lmdb) / split)
