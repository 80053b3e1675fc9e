"""config.toml -> typed, validated settings: the one place that knows every key and default.

Each section is a frozen dataclass whose fields carry their documentation, so the
commented `config.toml` written by `dicomnode init-config` (and shipped at the repository
root) is generated from the same definitions the node validates against. Unknown keys,
wrong types and out-of-range values fail at start-up with the key named.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from pathlib import Path
from typing import Any

from ai.limits import DEFAULT_OUTLINE_BAND_MM, DEFAULT_OUTLINE_CONTRAST_HU, MAX_WINDOW_OVERLAP

__all__ = [
    "AIConfig",
    "ConfigError",
    "Destination",
    "NodeConfig",
    "SeriesConfig",
    "Settings",
    "StorageConfig",
    "load_settings",
    "render_config_toml",
    "settings_from_mapping",
]

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE VR: no backslash, 16 chars
OUTPUT_KINDS = ("seg", "sr", "key_images", "pdf")


class ConfigError(ValueError):
    """A configuration key is unknown, mistyped or out of range; the message names it."""


def _doc(text: str, default: Any = dataclasses.MISSING, **kwargs: Any) -> Any:
    """A dataclass field with documentation for the generated config.toml."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"doc": text}, **kwargs)
    return field(default=default, metadata={"doc": text}, **kwargs)


def check_ae_title(key: str, value: str) -> str:
    """`value` when it is a valid AE title; a ConfigError naming `key` otherwise."""
    if not _AE_TITLE.match(value) or value.strip() == "":
        raise ConfigError(
            f"{key} = {value!r}: expected an AE title of 1-16 printable characters, no backslash"
        )
    return value


def _check_range(key: str, value: float, low: float, high: float | None = None) -> None:
    # TOML has nan and inf: nan passes every comparison, inf overflows date arithmetic.
    if not math.isfinite(value):
        raise ConfigError(f"{key} = {value!r}: expected a finite number")
    if value < low or (high is not None and value > high):
        upper = f" and <= {high}" if high is not None else ""
        raise ConfigError(f"{key} = {value!r}: expected a number >= {low}{upper}")


@dataclass(frozen=True)
class NodeConfig:
    """[node]: how the node appears on the DICOM network."""

    ae_title: str = _doc(
        "AE title the node answers to (callers must use it as Called AE).", "DICOMNODE"
    )
    host: str = _doc("Address to listen on; 0.0.0.0 listens on every interface.", "0.0.0.0")
    port: int = _doc(
        "TCP port of the Storage SCP (11112 is the registered DICOM port; 0 picks a free one).",
        11112,
    )
    max_associations: int = _doc(
        "Simultaneous associations accepted (pynetdicom's default is 10).", 32
    )
    allowed_calling_aets: list[str] = _doc(
        "Calling AE titles allowed to connect; empty allows any caller.", []
    )
    allowed_peers: list[str] = _doc(
        "IP addresses or networks (CIDR, e.g. 10.1.2.0/24) allowed to connect; empty allows"
        " any host. The calling AE title is the sender's own to choose; its address is not.",
        [],
    )
    check_called_aet: bool = _doc("Reject associations whose Called AE is not ae_title.", True)
    tls_cert: str = _doc("PEM certificate; tls_cert and tls_key set turn TLS on.", "")
    tls_key: str = _doc("PEM private key of tls_cert.", "")
    tls_ca: str = _doc("PEM CA bundle; when set, callers must present a certificate it signed.", "")
    acse_timeout_s: float = _doc("Seconds to wait for association negotiation messages.", 30.0)
    dimse_timeout_s: float = _doc("Seconds to wait for DIMSE messages within an association.", 60.0)
    network_timeout_s: float = _doc(
        "Seconds of network silence before an association is aborted.", 120.0
    )
    max_pdu_bytes: int = _doc(
        "Largest PDU the node accepts (0 = unlimited; large is faster).", 4_194_304
    )
    log_level: str = _doc("Logging level: DEBUG, INFO, WARNING or ERROR.", "INFO")

    def peer_networks(self) -> list[IPv4Network | IPv6Network]:
        """`allowed_peers` parsed (a bare address is a network of one)."""
        networks: list[IPv4Network | IPv6Network] = []
        for value in self.allowed_peers:
            try:  # strict: "10.1.2.3/8" (host bits set) is a typo, not all of 10/8
                network = ip_network(value)
            except ValueError as exc:
                raise ConfigError(f"node.allowed_peers: {value!r} is not an IP address or"
                                  f" network (e.g. 10.1.2.3 or 10.1.2.0/24): {exc}") from None
            mapped = network.network_address
            if isinstance(mapped, IPv6Address) and mapped.ipv4_mapped and network.prefixlen >= 96:
                # ::ffff:10.1.2.0/120, as a dual-stack socket shows 10.1.2.x: compared as IPv4
                network = ip_network(f"{mapped.ipv4_mapped}/{network.prefixlen - 96}")
            networks.append(network)
        return networks

    def __post_init__(self) -> None:
        check_ae_title("node.ae_title", self.ae_title)
        for title in self.allowed_calling_aets:
            check_ae_title("node.allowed_calling_aets", title)
        self.peer_networks()  # each one parses
        _check_range("node.port", self.port, 0, 65535)
        _check_range("node.max_associations", self.max_associations, 1, 10_000)
        _check_range("node.acse_timeout_s", self.acse_timeout_s, 0.1)
        _check_range("node.dimse_timeout_s", self.dimse_timeout_s, 0.1)
        _check_range("node.network_timeout_s", self.network_timeout_s, 0.1)
        _check_range("node.max_pdu_bytes", self.max_pdu_bytes, 0)
        if self.log_level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ConfigError(
                f"node.log_level = {self.log_level!r}: expected DEBUG, INFO, WARNING or ERROR"
            )
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("node.tls_cert and node.tls_key: set both to enable TLS, or neither")
        if self.tls_ca and not self.tls_cert:
            raise ConfigError(
                "node.tls_ca is set but node.tls_cert/tls_key are not: TLS needs both"
            )

    @property
    def tls_enabled(self) -> bool:
        return bool(self.tls_cert)


@dataclass(frozen=True)
class StorageConfig:
    """[storage]: where received instances, outputs and the index live."""

    data_dir: str = _doc(
        "Directory for instances, outputs and index.sqlite (created if missing).",
        "./dicomnode-data",
    )
    database_url: str = _doc(
        "SQLAlchemy URL of the study index; empty means sqlite:///<data_dir>/index.sqlite.", ""
    )
    min_free_disk_mb: int = _doc(
        "Below this free space in data_dir, C-STORE answers 0xA700 (out of resources).", 1024
    )

    def __post_init__(self) -> None:
        if not self.data_dir:
            raise ConfigError("storage.data_dir is empty: expected a directory path")
        _check_range("storage.min_free_disk_mb", self.min_free_disk_mb, 0)

    def resolved_database_url(self, base: Path) -> str:
        """The index URL, defaulting to SQLite inside data_dir."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_path(base) / 'index.sqlite').as_posix()}"

    def data_path(self, base: Path) -> Path:
        """data_dir, relative paths taken from the config file's directory."""
        path = Path(self.data_dir).expanduser()
        return path if path.is_absolute() else (base / path).resolve()


@dataclass(frozen=True)
class SeriesConfig:
    """[series]: when a series is complete and which series qualify for AI."""

    quiet_seconds: float = _doc("A series is complete after this long without new instances.", 10.0)
    release_grace_seconds: float = _doc(
        "Once the association that sent the latest instance is released, complete after "
        "this long without instances.", 2.0
    )
    max_wait_seconds: float = _doc(
        "Hard deadline from a collecting pass's first instance: complete even if instances "
        "keep arriving.", 600.0
    )
    modalities: list[str] = _doc("Modalities analysed.", ["CT"])
    min_slices: int = _doc("Fewest instances for a series to be analysed.", 40)
    max_slice_thickness_mm: float = _doc("Thickest SliceThickness analysed (mm).", 5.0)
    image_type_excludes: list[str] = _doc(
        "Skip a series whose ImageType contains any of these values.",
        ["LOCALIZER", "DERIVED", "SECONDARY"],
    )
    image_type_requires: list[str] = _doc(
        "Skip a series whose ImageType lacks any of these values; empty requires nothing.", []
    )
    description_regex: str = _doc(
        "SeriesDescription must match this regular expression (search, case-insensitive); "
        "empty matches any.",
        "",
    )
    body_part_regex: str = _doc(
        "BodyPartExamined must match this regular expression when present (search, "
        "case-insensitive); empty matches any.",
        "",
    )
    require_axial: bool = _doc("Skip series whose slices are not axial (within 10 degrees).", True)

    def __post_init__(self) -> None:
        _check_range("series.quiet_seconds", self.quiet_seconds, 0.1)
        _check_range("series.release_grace_seconds", self.release_grace_seconds, 0.0)
        _check_range("series.max_wait_seconds", self.max_wait_seconds, self.quiet_seconds)
        _check_range("series.min_slices", self.min_slices, 1)
        _check_range("series.max_slice_thickness_mm", self.max_slice_thickness_mm, 0.01)
        if not self.modalities:
            raise ConfigError('series.modalities is empty: expected a list such as ["CT"]')
        for key in ("description_regex", "body_part_regex"):
            try:
                re.compile(getattr(self, key))
            except re.error as exc:
                raise ConfigError(f"series.{key}: not a valid regular expression ({exc})") from None


MIRROR_CHOICES = {"auto": None, "on": True, "off": False}
"""`[ai] mirror` values and what `ai.infer.analyse(mirror=...)` gets for each."""


@dataclass(frozen=True)
class AIConfig:
    """[ai]: the model and its analysis."""

    checkpoint: str = _doc("Model checkpoint; empty uses the shipped default weights.", "")
    device: str = _doc("auto (CUDA when present), cpu, cuda or cuda:N.", "auto")
    peripheral_thickness_mm: float = _doc(
        "Thickness of the peripheral lung band for the PLR (paper eq. 1, sigma).", 10.0
    )
    peripheral_outline_closing_mm: float = _doc(
        "Each lung's outline is closed per slice by a disk of this radius before the"
        " peripheral band is measured, so that a bite a consolidation cut into the lung mask"
        " is not taken for pleura; 0 measures from the lung mask itself.", 10.0
    )
    # ai.infer's default, with which the shipped weights were evaluated (docs/training.md).
    min_lesion_volume_mm3: float = _doc(
        "Lesion components smaller than this are removed as noise.", 10.0
    )
    consolidation_hu: float = _doc(
        "Lesion voxels at or above this HU count as consolidation, below as ground-glass.",
        -300.0,
    )
    outline_band_mm: float = _doc(
        "Lung voxels inside the network's lesions or within this distance of them are"
        " decided again by their density above the surrounding lung, which sharpens the"
        " outlines (ai/refine.py); 0 keeps the network's own outline.",
        DEFAULT_OUTLINE_BAND_MM,
    )
    outline_contrast_hu: float = _doc(
        "How many HU above the local lung parenchyma makes such a voxel lesion.",
        DEFAULT_OUTLINE_CONTRAST_HU,
    )
    mirror: str = _doc(
        "Test-time mirroring: average the lesion probability over the scan as it is, "
        "mirrored left-right, flipped along its slices, and both (better masks, four times "
        "the segmentation time): auto (on a GPU only), on or off.", "auto"
    )
    window_overlap: float | str = _doc(
        "Share of each segmentation window that its neighbours cover too, blended (better "
        "masks, and the classifier reads them; 0.5 takes about 4 x the segmentation "
        "time): auto (0.5 on a GPU, 0 on a CPU) or a number from 0 to "
        f"{MAX_WINDOW_OVERLAP}.", "auto"
    )
    disease_thresholds: list[float] = _doc(
        "Operating point: [COVID-19, CAP] probabilities from which a disease is called (the "
        "more probable when both are reached), else non-pneumonia; empty: the most probable "
        "class.", []
    )

    def __post_init__(self) -> None:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"ai.device = {self.device!r}: expected auto, cpu, cuda or cuda:N")
        if self.mirror not in MIRROR_CHOICES:
            raise ConfigError(f"ai.mirror = {self.mirror!r}: expected auto, on or off")
        if isinstance(self.window_overlap, str):
            if self.window_overlap != "auto":
                raise ConfigError(f"ai.window_overlap = {self.window_overlap!r}: expected auto"
                                  f" or a number from 0 to {MAX_WINDOW_OVERLAP}")
        else:
            _check_range("ai.window_overlap", self.window_overlap, 0.0, MAX_WINDOW_OVERLAP)
        if self.disease_thresholds and len(self.disease_thresholds) != 2:
            raise ConfigError(f"ai.disease_thresholds = {self.disease_thresholds!r}: expected"
                              " [] or two probabilities [COVID-19, CAP]")
        for value in self.disease_thresholds:
            _check_range("ai.disease_thresholds", value, 0.0, 1.0)
        _check_range("ai.peripheral_thickness_mm", self.peripheral_thickness_mm, 0.0, 100.0)
        _check_range("ai.peripheral_outline_closing_mm", self.peripheral_outline_closing_mm,
                     0.0, 100.0)
        _check_range("ai.min_lesion_volume_mm3", self.min_lesion_volume_mm3, 0.0, 1e6)
        _check_range("ai.consolidation_hu", self.consolidation_hu, -1000.0, 1000.0)
        _check_range("ai.outline_band_mm", self.outline_band_mm, 0.0, 100.0)
        _check_range("ai.outline_contrast_hu", self.outline_contrast_hu, -1000.0, 1000.0)


@dataclass(frozen=True)
class PipelineConfig:
    """[pipeline]: how complete series are analysed and which results are made."""

    workers: int = _doc(
        "AI worker processes; one is right for a GPU, more only with spare CPU cores; "
        "0 receives and queues only.", 1
    )
    failure_notice: bool = _doc(
        "When analysis fails, send the destinations a short SR saying so and why.", False
    )
    max_lesion_segments: int = _doc(
        "Individual lesions given their own SEG segment and SR group (largest first).", 10
    )
    seg_omit_empty_frames: bool = _doc(
        "Leave empty frames out of the SEG (about 5x smaller and faster); false for "
        "viewers that misplace such SEGs (OHIF v2, older dcmjs).",
        True,
    )
    key_images: int = _doc("Key images: the slices with the largest lesion area.", 3)
    sr_image_library: bool = _doc(
        "Add the TID 1600 image library (an entry per CT image) to the SR: optional in "
        "TID 1500 and slow to build (seconds per 300 slices).", False
    )
    job_timeout_seconds: float = _doc(
        "An AI worker still on one job after this long is taken as hung: it is killed and "
        "replaced, and the job counts an attempt.", 1800.0
    )
    max_attempts: int = _doc(
        "Claims of one job before a crash of its AI worker (out of memory, say) or an "
        "error of the node's own (not a rejected series) fails it instead of queueing it "
        "again.", 2
    )

    def __post_init__(self) -> None:
        _check_range("pipeline.workers", self.workers, 0, 64)
        _check_range("pipeline.max_attempts", self.max_attempts, 1, 100)
        _check_range("pipeline.job_timeout_seconds", self.job_timeout_seconds, 1.0, 86400.0)
        # Each segment adds up to a frame per slice: with empty frames kept, 50 segments of
        # a 300-slice 512 x 512 series are about 500 MB of SEG, as far as is sensible.
        _check_range("pipeline.max_lesion_segments", self.max_lesion_segments, 0, 50)
        _check_range("pipeline.key_images", self.key_images, 0, 20)


@dataclass(frozen=True)
class ExportConfig:
    """[export]: delivery of results to the destinations."""

    retry_initial_seconds: float = _doc("First retry delay; doubled after each failure.", 10.0)
    retry_max_seconds: float = _doc("Longest delay between retries.", 600.0)
    give_up_after_seconds: float = _doc(
        "Stop retrying a delivery this long after it was queued (it is then failed).", 86400.0
    )
    timeout_seconds: float = _doc(
        "Network timeout of an export association: the connect, each answer, and a peer "
        "that stops reading; a C-STORE's answer gets 1 s more per MB of its file.", 60.0)

    def __post_init__(self) -> None:
        # At least a second between tries: 0 would reconnect to a PACS that is down in a
        # tight loop for the whole give-up time.
        _check_range("export.retry_initial_seconds", self.retry_initial_seconds, 1.0)
        _check_range("export.retry_max_seconds", self.retry_max_seconds,
                     self.retry_initial_seconds)
        _check_range("export.give_up_after_seconds", self.give_up_after_seconds, 0.0,
                     366 * 86400.0)
        _check_range("export.timeout_seconds", self.timeout_seconds, 0.1)


@dataclass(frozen=True)
class Destination:
    """[[destinations]]: a DICOM node (a PACS) that receives the results."""

    name: str = _doc("A short name used in logs and `dicomnode status`.")
    ae_title: str = _doc("Called AE title of the destination.")
    host: str = _doc("Host name or address of the destination.")
    port: int = _doc("Port of the destination's Storage SCP.")
    outputs: list[str] = _doc("Which results to send: seg, sr, key_images, pdf.", ["seg", "sr"])
    tls: bool = _doc("Send over DICOM TLS, verifying the destination's certificate.", False)
    tls_ca: str = _doc(
        "PEM CA bundle that signed the destination's certificate; empty: the system's CAs.", ""
    )
    tls_cert: str = _doc(
        "PEM client certificate, for a destination that requires one (with tls_key).", ""
    )
    tls_key: str = _doc("PEM private key of tls_cert.", "")

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("destinations.name is empty: expected a short name")
        check_ae_title(f"destinations[{self.name}].ae_title", self.ae_title)
        if not self.host.strip():
            raise ConfigError(f"destinations[{self.name}].host is empty: expected a host name"
                              " or address")
        _check_host(f"destinations[{self.name}].host", self.host)
        _check_range(f"destinations[{self.name}].port", self.port, 1, 65535)
        if not self.outputs:
            raise ConfigError(f"destinations[{self.name}].outputs is empty: the destination"
                              f" would receive nothing; expected some of {', '.join(OUTPUT_KINDS)}")
        for kind in self.outputs:
            if kind not in OUTPUT_KINDS:
                raise ConfigError(
                    f"destinations[{self.name}].outputs: {kind!r} is not one of "
                    f"{', '.join(OUTPUT_KINDS)}"
                )
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError(f"destinations[{self.name}].tls_cert and tls_key: set both for a"
                              " client certificate, or neither")
        if not self.tls and (self.tls_ca or self.tls_cert):
            raise ConfigError(f"destinations[{self.name}].tls_ca / tls_cert are set but tls is"
                              " false: set tls = true to send over TLS")


@dataclass(frozen=True)
class Settings:
    """All settings, plus the directory relative paths are resolved against."""

    node: NodeConfig = field(default_factory=NodeConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    series: SeriesConfig = field(default_factory=SeriesConfig)
    ai: AIConfig = field(default_factory=AIConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    destinations: tuple[Destination, ...] = ()
    base_dir: Path = field(default_factory=Path.cwd)

    def __post_init__(self) -> None:
        tables = [("node", self.node)] + [(f"destinations[{d.name}]", d) for d in self.destinations]
        for prefix, table in tables:
            for key in ("tls_cert", "tls_key", "tls_ca"):
                value = getattr(table, key)
                if value and not (self.base_dir / value).is_file():
                    raise ConfigError(f"{prefix}.{key} = {value!r}: no such file (relative"
                                      f" paths are taken from {self.base_dir})")

    @property
    def data_dir(self) -> Path:
        return self.storage.data_path(self.base_dir)

    @property
    def database_url(self) -> str:
        return self.storage.resolved_database_url(self.base_dir)


_SECTIONS: dict[str, type] = {
    "node": NodeConfig,
    "storage": StorageConfig,
    "series": SeriesConfig,
    "ai": AIConfig,
    "pipeline": PipelineConfig,
    "export": ExportConfig,
}


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is list:
        (inner,) = typing.get_args(annotation)
        return f"a list of {_type_name(inner)}s"
    if isinstance(annotation, types.UnionType):
        return " or ".join(_type_name(option) for option in typing.get_args(annotation))
    return {str: "string", int: "integer", float: "number", bool: "true/false"}.get(
        annotation, str(annotation)
    )


def _coerce(key: str, annotation: Any, value: Any) -> Any:
    """Check one TOML value against a field type; ints are accepted where floats are."""
    origin = typing.get_origin(annotation)
    if origin is list:
        (inner,) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise ConfigError(f"{key} = {value!r}: expected {_type_name(annotation)}")
        return [_coerce(key, inner, item) for item in value]
    if isinstance(annotation, types.UnionType):  # e.g. float | str: the first that fits
        for option in typing.get_args(annotation):
            try:
                return _coerce(key, option, value)
            except ConfigError:
                continue
        raise ConfigError(f"{key} = {value!r}: expected {_type_name(annotation)}")
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is int and isinstance(value, bool):
        raise ConfigError(f"{key} = {value!r}: expected an integer")
    if not isinstance(value, annotation):
        raise ConfigError(f"{key} = {value!r}: expected {_type_name(annotation)}")
    return value


def _build_section(cls: type, table: Any, prefix: str) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"[{prefix}] must be a table of keys")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise ConfigError(
            f"{prefix}.{unknown[0]}: unknown key; expected one of {', '.join(sorted(fields))}"
        )
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}"
        if name in table:
            kwargs[name] = _coerce(key, hints[name], table[name])
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key} is missing: expected {_type_name(hints[name])}")
    return cls(**kwargs)


def _destination_key(number: int, table: Any) -> str:
    """How errors name a [[destinations]] table: by its name, else its position."""
    name = table.get("name") if isinstance(table, dict) else None
    return f"destinations[{name if isinstance(name, str) and name else number}]"


def settings_from_mapping(data: dict[str, Any], base_dir: Path) -> Settings:
    """Validate a parsed TOML document; raises ConfigError naming the offending key."""
    allowed = set(_SECTIONS) | {"destinations"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"[{unknown[0]}]: unknown section; expected {', '.join(sorted(allowed))}")
    sections = {
        name: _build_section(cls, data.get(name, {}), name) for name, cls in _SECTIONS.items()
    }
    raw_destinations = data.get("destinations", [])
    if not isinstance(raw_destinations, list):
        raise ConfigError("destinations must be an array of tables: [[destinations]]")
    destinations = tuple(
        _build_section(Destination, item, _destination_key(number, item))
        for number, item in enumerate(raw_destinations, start=1)
    )
    names = [d.name for d in destinations]
    if len(set(names)) != len(names):
        raise ConfigError(f"destinations.name: names must be unique, got {names}")
    return Settings(**sections, destinations=destinations, base_dir=base_dir)


_HOST_LABEL = r"[A-Za-z0-9]([A-Za-z0-9_-]*[A-Za-z0-9])?"
_HOST_NAME = re.compile(rf"^{_HOST_LABEL}(\.{_HOST_LABEL})*\.?$")


def _check_host(name: str, host: str) -> None:
    """A host name (RFC 1123) or an IP address; "10.0.0.1:104" or "dicom://pacs" would
    only fail at the first delivery, to be retried for a day."""
    try:
        ip_address(host)
        return
    except ValueError:
        pass
    if not _HOST_NAME.match(host):
        raise ConfigError(f"{name} = {host!r}: expected a host name or IP address alone"
                          " (the port goes in `port`)")


def load_settings(path: Path | None) -> Settings:
    """Read and validate a config file; None gives the defaults (relative to the cwd)."""
    if path is None:
        return Settings()
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: config file not found (create one: dicomnode init-config)"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    return settings_from_mapping(data, base_dir=path.resolve().parent)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def _render_fields(instance: Any, commented: bool = False) -> list[str]:
    lines: list[str] = []
    for f in dataclasses.fields(instance):
        lines.append(f"# {f.metadata['doc']}")
        lines.append(
            ("# " if commented else "") + f"{f.name} = {_toml_value(getattr(instance, f.name))}"
        )
    return lines


def render_config_toml(sections: dict[str, object] | None = None) -> str:
    """The commented default configuration (what `dicomnode init-config` writes), with
    the values of any section given in `sections` (e.g. a `StorageConfig` with its
    `data_dir`)."""
    given = sections or {}
    out = [
        "# dicomnode configuration. Every key is optional; shown here with its default.",
        "# Relative paths are taken from this file's directory.",
        "",
    ]
    for name, cls in _SECTIONS.items():
        out.append(f"# {cls.__doc__}")
        out.append(f"[{name}]")
        out.extend(_render_fields(given.get(name) or cls()))
        out.append("")
    out.append(f"# {Destination.__doc__}")
    out.append("# Zero or more tables; uncomment and edit to export results to a PACS.")
    example = Destination(name="pacs", ae_title="ORTHANC", host="127.0.0.1", port=4242)
    out.append("# [[destinations]]")
    out.extend(_render_fields(example, commented=True))
    out.append("")
    return "\n".join(out)
