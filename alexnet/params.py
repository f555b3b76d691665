"""The schema of `params.yaml`: every knob of the pipeline, declared once, typed and checked.

One section per DVC stage (a stage lists only the leaf keys it reads as its params deps),
plus `compute`, which says *where* and *how* work runs. Its `workers` and `scheduler`
never change a result, so no stage depends on them; `kernels` chooses between the
paper's formulas in plain torch and their fast equals, and `jpeg_decoder` who decodes a
`jpeg` store for a GPU (nvJPEG through torchvision, DALI, or the host's cores), which may
differ in rounding, so train and evaluate depend on both.
Every default is written here once. Loading fails with one line naming the offending
key (or, for a check across keys, both).
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Hashable
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError, to_jsonable_python

from alexnet.errors import AlexnetError

Kernels = Literal["fast", "reference"]
JpegDecoder = Literal["torchvision", "dali", "cpu"]
Resample = Literal["bilinear", "bicubic", "lanczos"]
Columns = Literal[1, 2]
# A share of the paper's kernels and units: halvings, so that every layer's count stays
# whole and even (two columns, grouped convolutions) down to a sixteenth.
Width = Literal[1.0, 0.5, 0.25, 0.125, 0.0625]
InputSize = Literal[224, 227]
Init = Literal["paper", "caffe", "kaiming"]
LightingScale = Literal["unit", "std255"]
Velocity = Literal["paper", "torch"]
Frames = Literal["first", "skip"]


class ParamsError(AlexnetError, ValueError):
    """A params file that cannot be used; the message is one line naming the key."""


SCHEDULER_ADDRESS = re.compile(r"([a-z]+://)?(\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):\d+")
DEFAULT_FILE = "params.yaml"  # may be absent (all defaults); a file named otherwise may not
DEVICE_HINT = "cpu, cuda, cuda:1, ..."
DEVICE_TYPES = ("cpu", "cuda")  # the devices the kernels, the decoders and the tests cover
# Images one forward pass of `alexnet predict` takes at most (its `--batch`), their 10
# crops N at a time (`alexnet.evaluate.crop_log_probabilities`): one image at a time made
# passes of one crop, slower (`bench/predict.py`). (Here: the CLI reads it without torch.)
PREDICT_BATCH = 16


# Device names read without torch: `cpu`, `cuda`, `cuda:N` (N < 100; torch itself wraps
# an index past 127 around). Importing torch to read them cost every stage command
# 2-4 s of CPU where params name cuda (the ImageNet preset), prepare's included.
PLAIN_DEVICE = re.compile(rf"({'|'.join(DEVICE_TYPES)})(:(0|[1-9][0-9]?))?")


def device_problem(name: str) -> str | None:
    """Why `name` is no device name torch knows (`gpu`), else None. Checked where the
    params load, so a typo stops `dvc repro` at its first stage, not after the stages
    before train; whether this machine has the device is checked where it runs."""
    if PLAIN_DEVICE.fullmatch(name):  # torch takes each of these (a test holds it)
        return None
    import torch  # here: only another name pays for it (torch says why it is none)

    try:
        device = torch.device(name)
    except RuntimeError:  # torch's own message lists every backend, over several lines
        return f"not a device name ({DEVICE_HINT})"
    if device.type not in DEVICE_TYPES:  # mps, meta, xpu: torch's names, not our paths
        return f"not a device this pipeline runs on ({DEVICE_HINT})"
    return None


def _known_device(name: str) -> str:
    if problem := device_problem(name):
        raise ValueError(problem)
    return name


DeviceName = Annotated[str, AfterValidator(_known_device)]


class _Section(BaseModel):
    # Unknown keys are errors: a typo must not silently fall back to a default. An
    # infinite or NaN float (`.inf`, `.nan` in YAML) is never a setting, only a mistake.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    # Keys that say how a stage's run is executed, none of its result: the stage's DVC
    # params (and a model file) leave them out, so changing them re-runs nothing.
    EXECUTION_KEYS: ClassVar[frozenset[str]] = frozenset()

    @field_validator("*", mode="before")
    @classmethod
    def _bools_for_bools(cls, value: object, info: ValidationInfo) -> object:
        """true/false only where a bool is expected: pydantic's lax mode takes `epochs:
        true` as 1 (and for a string or a list it says so itself)."""
        annotation = cls.model_fields[info.field_name].annotation
        if isinstance(value, bool) and bool not in (annotation, *get_args(annotation)):
            raise PydanticCustomError("bool_type", "Input should not be true or false")
        return value


class SynthParams(_Section):
    """The built-in demo dataset (`alexnet synth`)."""

    seed: int = Field(0, description="seed of the generator; same seed, same bytes")
    classes: int = Field(10, ge=2, le=10, description="number of object classes")
    train_per_class: int = Field(80, ge=1, description="training images per class")
    val_per_class: int = Field(20, ge=1, description="validation images per class")
    min_side: int = Field(160, ge=32, description="smallest image side, pixels")
    max_side: int = Field(1000, ge=32, description="largest image side, pixels")
    oddities: int = Field(
        2,
        ge=0,
        description="files of each real-ImageNet oddity (CMYK, grey, PNG-as-JPEG, "
        "truncated, empty, not an image) mixed into the training split",
    )
    quality: int = Field(90, ge=1, le=100, description="JPEG quality of the generated files")
    clutter: int = Field(
        8,
        ge=0,
        description="background clutter items: clutter/2 to clutter "
        "lines, boxes and blobs per image",
    )

    @model_validator(mode="after")
    def _sides_ordered(self) -> SynthParams:
        if self.min_side > self.max_side:
            sides = f"min_side ({self.min_side}) is larger than max_side ({self.max_side})"
            raise ValueError(sides)
        return self


class PrepareParams(_Section):
    """Raw images -> 256x256 JPEG shards (paper section 2)."""

    raw: str = Field(
        "data/raw",
        min_length=1,  # "" would read as the repository itself
        description="the raw dataset (train/<wnid>/*, val/...): data/raw is the demo's; "
        "for ImageNet an absolute path outside the repo",
    )
    size: int = Field(
        256, ge=8, description="shorter side is rescaled to this, then centre-cropped"
    )
    quality: int = Field(90, ge=1, le=100, description="JPEG quality of the prepared images")
    resample: Resample = Field("bilinear", description="antialiased resampling filter")
    shard_size: int = Field(500, ge=1, description="images per tar shard")
    max_pixels: int = Field(
        178_956_970, ge=1, description="larger images are skipped as decompression bombs"
    )
    max_skipped: float = Field(
        0.05, ge=0.0, le=1.0, description="fail the stage when a larger share of files is skipped"
    )
    exif_orientation: bool = Field(
        False,
        description="rotate/flip by the EXIF orientation tag before resizing; the original "
        "pipeline did not (false)",
    )
    icc_to_srgb: bool = Field(
        False,
        description="convert images with an embedded ICC profile to sRGB (needs LittleCMS); "
        "false keeps the stored values and drops the profile, as the original pipeline",
    )
    frames: Frames = Field(
        "first",
        description="animated GIF/APNG/WebP and multi-page TIFF: keep the first frame "
        "(reported as converted) or skip the file (a Multi-Picture JPEG, MPO, is one photo: "
        "its primary image, always kept)",
    )
    plugins: tuple[str, ...] = Field(
        (),
        description="Python modules imported before decoding, to register more formats "
        "with PIL (e.g. pillow_heif.HeifImagePlugin for HEIC photos)",
    )
    file_timeout: float = Field(
        60.0,
        gt=0,
        description="seconds one file may take to decode; a slower file is skipped as "
        "timed out (a crafted or pathological file)",
    )

    # The keys that decide each prepared image (the rest decide what is kept and how it
    # is sharded). A shard's fingerprint hashes them; the model file records them, so
    # `alexnet predict` prepares an image as the model's data was prepared.
    IMAGE_KEYS: ClassVar[tuple[str, ...]] = (
        "size",
        "quality",
        "resample",
        "max_pixels",
        "exif_orientation",
        "icc_to_srgb",
        "frames",
        "plugins",
    )

    def image_options(self) -> dict:
        """{key: value} of `IMAGE_KEYS`: the keyword arguments of `prepare_image`, as JSON
        values (a list for `plugins`), so they survive a JSON round trip unchanged (torchrun
        ranks and the decoder process receive them as JSON)."""
        return self.model_dump(include=set(self.IMAGE_KEYS), mode="json")


class PackParams(_Section):
    """Prepared shards -> one LMDB store per split (docs/design.md, "LMDB")."""

    encoding: Literal["raw", "jpeg"] = Field(
        "raw", description="raw: HWC uint8 bytes (fastest reads, ~196 KB/image); jpeg: as prepared"
    )
    shuffle_train: bool = Field(True, description="store train records in a seeded random order")
    seed: int = Field(0, description="seed of the train order")
    batch: int = Field(
        256, ge=1, description="records per parallel read task (its memory; not the output bytes)"
    )


class ModelParams(_Section):
    """The network (paper section 3) and its ablation switches."""

    columns: Columns = Field(
        2, description="2 = the paper's two columns; 1 = section 3.2's one-GPU net"
    )
    width: Width = Field(
        1.0,
        description="every layer's kernels and fc6/fc7's units as a share of the paper's "
        "(1); 0.125: an eighth, ~40x fewer weights, a quick net for a CPU",
    )
    lrn: bool = Field(True, description="local response normalisation after conv1, conv2 (3.3)")
    overlap_pool: bool = Field(True, description="max-pool 3x3 stride 2 (3.4); false: 2x2 stride 2")
    dropout: float = Field(0.5, ge=0.0, lt=1.0, description="dropout on fc6 and fc7 outputs (4.2)")
    input_size: InputSize = Field(
        224, description="224 with conv1 padding 2 (torchvision), or 227 unpadded (Caffe)"
    )
    init: Init = Field(
        "paper",
        description="paper: N(0, 0.01), biases 1/0 as section 5; caffe: bias 0.1, "
        "fc6/fc7 std 0.005; kaiming: He-normal",
    )


class TrainParams(_Section):
    """The recipe of paper sections 4-5 (alexnet/train.py)."""

    # Keys that say where and how a run is executed, none of the recipe: a checkpoint
    # stays valid too. The
    # number of processes is not bit-neutral (ranks past 0 draw their own dropout masks,
    # the gradient is summed in another order), but it is kept out so that a run resumes
    # on another count (a lost node) and moving to more GPUs retrains nothing.
    EXECUTION_KEYS: ClassVar[frozenset[str]] = frozenset(
        {
            "loader_workers",
            "sync_every",
            "checkpoint_minutes",
            "nproc_per_node",
            "nnodes",
            "rdzv_endpoint",
        }
    )

    epochs: int = Field(90, ge=1, description="epoch budget (paper: ~90)")
    batch_size: int = Field(128, ge=1, description="SGD batch (paper: 128)")
    lr: float = Field(0.01, gt=0, description="initial learning rate (paper: 0.01)")
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    decay_biases: bool = Field(
        False,
        description="decay the biases too (the paper writes its rule for a weight w; its "
        "authors' cuda-convnet decayed no bias)",
    )
    velocity: Velocity = Field(
        "paper",
        description="the velocity at a rate drop: 'paper' carries the old rate, fading by "
        "the momentum (section 5's rule); 'torch' takes the new rate at once (torch's SGD)",
    )
    lr_patience: int = Field(
        2,
        ge=0,
        description="a plateau is more epochs than this without val improvement (2: the "
        "rate drops after the third)",
    )
    lr_threshold: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="relative val-error gain that counts (below 1: a gain of 1 is none)",
    )
    max_lr_drops: int = Field(3, ge=0, description="divisions by 10 before the final plateau")
    stop_at_last_plateau: bool = Field(True, description="stop at the plateau after the last drop")
    max_epochs_per_rate: int | None = Field(
        None,
        ge=1,
        description="also divide the rate after this many epochs at it (short "
        "budgets; not in the paper; null = plateaus only)",
    )
    seed: int = 0
    deterministic: bool = Field(
        True,
        description="bit-repeatable CPU runs (on CUDA it costs speed: cuDNN's "
        "deterministic algorithms, and every new tensor filled)",
    )
    # A tuple: the frozen section stays hashable; YAML lists and JSON arrays validate into it.
    device: tuple[DeviceName, ...] = Field(
        ("cpu",),
        min_length=1,
        max_length=2,  # one a column: refused with the params, not after the stages before
        description=f"{DEVICE_HINT}; two devices ([cuda:0, cuda:1]) = one "
        "column of the network on each (model parallel)",
    )
    random_crop: bool = Field(
        True, description="random model.input_size crops (else the centre one)"
    )
    flip: bool = Field(True, description="horizontal reflections with p=0.5")
    lighting: float = Field(0.1, ge=0, description="PCA lighting sigma (0 = off)")
    lighting_scale: LightingScale = Field(
        "unit", description="eigenvalues of [0,1] pixels, or std devs of 0-255 (docs/paper.md)"
    )
    subtract_mean: bool = Field(
        True,
        description="subtract the mean image's window (off: in validation and the model file too)",
    )
    # Minutes, not steps: 1000 steps are 9 s on a GPU and an hour on a laptop's CPU, and
    # a checkpoint (~0.5 GB, synced) costs the same on both.
    checkpoint_minutes: float = Field(
        10.0,
        ge=0,
        description="minutes of training between checkpoints, besides each epoch's end; "
        "due at the first loss read (sync_every) after them (0 = at every read)",
    )
    sync_every: int = Field(
        20,
        ge=1,
        description="steps between reads of the loss on the host: the device runs ahead "
        "meanwhile, and a NaN stops the run within this many steps (1 = every step)",
    )
    val_batch_size: int = Field(100, ge=1)
    amp: bool = Field(False, description="bf16 autocast (GPU speed switch)")
    channels_last: bool = Field(False, description="channels-last memory format")
    compile: bool = Field(
        False,
        description="torch.compile the whole step (augmentation, forward, backward, SGD "
        "update), as CUDA graphs on CUDA; dropout draws differ from the eager step's",
    )
    loader_workers: int = Field(0, ge=0, description="DataLoader processes reading ahead")
    nproc_per_node: int = Field(
        1, ge=1, description="data-parallel processes per node (torchrun; one GPU each on CUDA)"
    )
    nnodes: int = Field(1, ge=1, description="nodes; run `alexnet train` on each")
    rdzv_endpoint: str = Field(
        "localhost:29400",
        description="torchrun rendezvous host:port (a node all nodes reach), multi-node only",
    )

    @field_validator("device", mode="before")
    @classmethod
    def _device_list(cls, value: object) -> object:
        """`cpu` or `cuda:0,cuda:1` as written in YAML -> the device names."""
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(","))
        return value

    @model_validator(mode="after")
    def _devices_for_processes(self) -> TrainParams:
        # Under torchrun each process wraps its model in DDP, which takes parameters on
        # one kind of device only; and an explicit GPU is the same GPU in every process of
        # a node (NCCL then fails at its first collective, in pages of traceback).
        if self.nproc_per_node * self.nnodes == 1:
            return self
        kinds = {name.partition(":")[0] for name in self.device}
        if len(kinds) > 1:
            raise ValueError(
                f"device {list(self.device)} mixes {' and '.join(sorted(kinds))}, which "
                "several processes (nproc_per_node, nnodes) cannot: DDP takes a model on "
                "one kind of device (two columns each: [cuda:0, cuda:1])"
            )
        if self.nproc_per_node > 1 and len(self.device) == 1 and self.device[0].startswith("cuda:"):
            raise ValueError(
                f"device {self.device[0]!r} would be one GPU for all {self.nproc_per_node} "
                "processes of a node (nproc_per_node): say `cuda`, each its own"
            )
        return self

    @model_validator(mode="after")
    def _rendezvous_reachable(self) -> TrainParams:
        # On several nodes a loopback endpoint is each node's own: every node would wait
        # for peers that never come, until torchrun's join timeout.
        if self.nnodes > 1 and (kind := _no_node(_rendezvous_host(self.rdzv_endpoint))):
            raise ValueError(
                f"nnodes ({self.nnodes}) needs an rdzv_endpoint every node reaches, not "
                f"{kind} {self.rdzv_endpoint!r}"
            )
        return self


def _rendezvous_host(endpoint: str) -> str:
    """The host of `host:port` as torchrun reads it (`[::1]:29400`, a port left out)."""
    # torch here: only a multi-node file pays for it, and its train stage imports torch.
    from torch.distributed.elastic.rendezvous.utils import parse_rendezvous_endpoint

    try:
        host, _ = parse_rendezvous_endpoint(endpoint, default_port=0)  # any port will do
    except ValueError as error:  # a bad port or host: torch's one line, with the key's name
        raise ValueError(f"rdzv_endpoint: {error}") from None
    return host


def _no_node(host: str) -> str | None:
    """What `host` is where no other node reaches it by that name: "the loopback"
    (localhost, 127.x.x.x, ::1: each node's own) or "the unspecified address" (0.0.0.0,
    ::: a listener's "any address", no host's; torch waited, then printed pages of C++
    frames). By the name alone (resolving it here would make loading params wait on
    DNS; the machine's own name passes, as it may be the host)."""
    if host.lower() == "localhost":
        return "the loopback"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:  # a host name
        return None
    if address.is_loopback:
        return "the loopback"
    return "the unspecified address" if address.is_unspecified else None


class EvaluateParams(_Section):
    """Section 4.1's 10-crop test (alexnet/evaluate.py)."""

    # Read-ahead keeps the batches' order: the same numbers. (The batch size and the
    # device are not here: they change the rounding, so the metrics' last digits.)
    EXECUTION_KEYS: ClassVar[frozenset[str]] = frozenset({"loader_workers"})

    batch_size: int = Field(50, ge=1, description="images per batch (x10 crops on the device)")
    device: DeviceName = Field("cpu", description=DEVICE_HINT)
    loader_workers: int = Field(
        0, ge=0, description="DataLoader processes reading ahead (0 = in the loop)"
    )
    # The stage's forwards (10 crops, neighbour search); both change the metrics' rounding.
    amp: bool = Field(False, description="bf16 autocast (GPU speed switch)")
    channels_last: bool = Field(False, description="channels-last memory format")
    # Section 6.1's figures (alexnet/figures.py): which images, how many neighbours.
    gallery: int = Field(16, ge=1, description="validation images shown with their top 5")
    queries: int = Field(5, ge=1, description="validation images whose neighbours are shown")
    neighbours: int = Field(6, ge=1, description="nearest training images per query")
    neighbour_batch: int = Field(
        128, ge=1, description="training images per batch of the neighbour search (its memory)"
    )
    seed: int = Field(0, description="picks the gallery's and the queries' images")
    plot_classes: int = Field(
        30,
        ge=1,
        description="the per-class bar chart and the confusion matrix show the classes of "
        "highest top-1 error, at most this many (per_class.csv and confusion.csv keep all)",
    )


class ServeParams(_Section):
    """The Prefect deployments of `alexnet serve` (flows/serve.py)."""

    retrain_cron: str = Field("0 3 * * 1", description="cron schedule of the retrain deployment")
    timezone: str = Field("UTC", description="time zone of the cron schedule")
    late_after_minutes: int = Field(
        60, ge=1, description="a retrain starting later than this after its time is skipped"
    )


class ComputeParams(_Section):
    """Where parallel work runs (results are identical whatever `workers` and `scheduler`
    say), and which implementation of the paper's formulas runs (`kernels`)."""

    workers: int = Field(
        0,
        ge=0,
        description="parallel workers: the process pool's size (0 = one per CPU core), or "
        "on a Dask cluster its worker count (0 = a running cluster's own, its threads)",
    )
    scheduler: str | None = Field(
        None,
        description="where the tasks run: null = the process pool (no Dask), 'local' = a "
        "temporary Dask LocalCluster, 'tcp://host:8786' = a running Dask cluster",
    )

    @field_validator("scheduler")
    @classmethod
    def _scheduler_address(cls, value: str | None) -> str | None:
        # Dask needs the port; without this check a typo fails deep inside distributed.
        if value is None or value == "local" or SCHEDULER_ADDRESS.fullmatch(value):
            return value
        raise ValueError("expected null, 'local' or a Dask scheduler's address, tcp://host:port")

    window_mb: int = Field(
        128,
        ge=1,
        description="MB of task results a flow holds at once: how far pack's readers and "
        "stats' shards run ahead of the single writer (memory stays flat, whatever the data)",
    )
    kernels: Kernels = Field(
        "fast",
        description="fast: one-pass kernels (numba on CPU, compiled on CUDA), equal to the "
        "reference within float rounding; reference: the paper's formulas in plain torch",
    )
    jpeg_decoder: JpegDecoder = Field(
        "torchvision",
        description="what decodes a jpeg store's batches for a CUDA device: torchvision "
        "(batched nvJPEG on the GPU), dali (NVIDIA DALI on the GPU; the [dali] extra, "
        "torchvision where it is missing), or cpu (libjpeg-turbo on the loader workers' "
        "threads, as for a CPU device: where the host's cores decode faster than the "
        "GPU); equal within decoder differences (docs/design.md)",
    )


class Params(_Section):
    synth: SynthParams = SynthParams()
    prepare: PrepareParams = PrepareParams()
    pack: PackParams = PackParams()
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    serve: ServeParams = ServeParams()
    compute: ComputeParams = ComputeParams()

    @model_validator(mode="after")
    def _crops_fit(self) -> Params:
        # Training and evaluation crop `model.input_size` out of each prepared image.
        if self.prepare.size < self.model.input_size:
            raise ValueError(
                f"prepare.size ({self.prepare.size}) is smaller than the crops of "
                f"model.input_size ({self.model.input_size})"
            )
        return self

    @model_validator(mode="after")
    def _a_column_a_device(self) -> Params:
        # Two devices hold the paper's two columns (section 3.2), one each.
        if len(self.train.device) == 2 and self.model.columns == 1:
            raise ValueError(
                f"train.device {list(self.train.device)} places a column on each device, "
                "and model.columns is 1: name one device, or model.columns 2"
            )
        return self


def recipe_keys(section: str) -> tuple[str, ...]:
    """`section.key` for each key of a section but its execution keys: the params deps
    of a stage that reads the section."""
    fields = type(getattr(Params(), section))
    return tuple(
        f"{section}.{key}" for key in fields.model_fields if key not in fields.EXECUTION_KEYS
    )


class _UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.safe_load`'s loader, but a key written twice in one mapping is an error:
    PyYAML keeps the last, so a second `train:` section silently replaced the first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:  # before merge keys (`<<`) are flattened in
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):  # PyYAML's own error says so, with its line
                continue
            if key in first:
                line, again = first[key].line + 1, key_node.start_mark.line + 1
                raise ParamsError(f"duplicate key {key!r} on line {again} (first on line {line})")
            first[key] = key_node.start_mark
        return super().construct_mapping(node, deep)


def _read_yaml(path: Path) -> Any:
    """The YAML document of a params file; a key written twice is an error."""
    return yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)


def _describe(error: ValidationError, source: str, section: str = "", *, keyed: bool = True) -> str:
    """The first validation error as one line: `params.yaml: prepare.quality: <why>`
    (`section`: the one the validated mapping is, when it is not the whole file;
    `keyed` False: `source` names the key already, as an option does)."""
    first = error.errors()[0]
    key = ".".join(str(part) for part in (section, *first["loc"]) if part)
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown key '{key}'"
    # Our own checks' messages, without pydantic's "Value error, " before them.
    why = str(first["ctx"]["error"]) if first["type"] == "value_error" else first["msg"]
    if not key:  # a check across keys: its message names them
        return f"{source}: {why}"
    got = first.get("input")
    shown = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"{source}: {key}: {why}{shown}" if keyed else f"{source}: {why}{shown}"


def parse_params(data: object, source: str = "params") -> Params:
    """Validate an already-loaded mapping."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ParamsError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
    try:
        return Params.model_validate(data)
    except ValidationError as error:
        raise ParamsError(_describe(error, source)) from None


def _yaml_problem(error: yaml.YAMLError) -> str:
    """Where and why a file is not valid YAML, from PyYAML's marks: the line it stopped
    at, from the line of what it was reading where that is earlier (a `[` not closed)."""
    mark, context = getattr(error, "problem_mark", None), getattr(error, "context_mark", None)
    if mark is None:
        return "not valid YAML"
    first = context.line + 1 if context is not None else mark.line + 1
    lines = f"line {mark.line + 1}" if first >= mark.line + 1 else f"lines {first}-{mark.line + 1}"
    problem = getattr(error, "problem", None)
    return f"{lines} not valid YAML" + (f" ({' '.join(problem.split())})" if problem else "")


def load_params(path: str | Path | None = None) -> Params:
    """Read and validate a params file. Without a path, `params.yaml` here, and all
    defaults when it is absent; a file named by the user must be there (a typo must not
    run on the defaults)."""
    if path is None:
        path = Path(DEFAULT_FILE)
        if not path.exists():
            return Params()
    path = Path(path)
    try:
        data = _read_yaml(path)
    except FileNotFoundError:
        raise ParamsError(f"{path}: no such params file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ParamsError(f"{path}: cannot read it ({type(error).__name__})") from None
    except ParamsError as error:  # a duplicate key
        raise ParamsError(f"{path}: {error}") from None
    except yaml.YAMLError as error:
        raise ParamsError(f"{path}: {_yaml_problem(error)}") from None
    return parse_params(data, str(path))


def with_compute(params: Params, **values: object) -> Params:
    """`params` with `compute` keys replaced (the command line's --workers, --scheduler),
    validated as the file's values are; a value refused is said as its option's."""
    compute = {**params.compute.model_dump(), **values}
    try:
        return params.model_copy(update={"compute": ComputeParams.model_validate(compute)})
    except ValidationError as error:
        (key, *_) = error.errors()[0]["loc"] or ("",)
        if key in values:  # the option's own value: `--workers: ... (got -1)`
            option = "--" + str(key).replace("_", "-")
            raise ParamsError(_describe(error, option, keyed=False)) from None
        raise ParamsError(_describe(error, "command line", "compute")) from None


def param_value(params: Params, key: str) -> Any:
    """The value of `section.name` (ParamsError for a key the schema does not have)."""
    section, _, name = key.partition(".")
    values = getattr(params, section, None)
    if not isinstance(values, _Section) or name not in type(values).model_fields:
        raise ParamsError(f"no parameter {key!r}: keys are section.name, as in params.yaml")
    return getattr(values, name)


def param_text(params: Params, key: str) -> str:
    """`param_value` as `alexnet param` prints it and prefect.yaml's build steps read it:
    a string as it is (the cron), anything else as JSON, which YAML reads too (true,
    null, ["cpu"]; not Python's True, None, ('cpu',))."""
    value = param_value(params, key)
    return value if isinstance(value, str) else json.dumps(to_jsonable_python(value))


# Every default of the schema, for library functions whose keyword defaults follow it
# (`AlexNet(columns=DEFAULTS.model.columns, ...)`): written once, above.
DEFAULTS = Params()
