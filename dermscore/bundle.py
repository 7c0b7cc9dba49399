"""Model bundles: a folder with ``bundle.json`` and one Keras 3 ``.keras`` file per ensemble member.

The manifest is the single contract between training (which writes bundles) and scoring (which
reads them): each member declares its own input size, resize method and preprocessing, so the caller
never has to know how a member was trained. Every weight file carries its sha256 and is refused when
it does not match, because a silently swapped or corrupted model in a clinical tool is worse than none.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dermscore.errors import BundleError

MANIFEST = "bundle.json"
FORMAT_VERSION = 1
CLASS_CODES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
DEFAULT_MALIGNANT = ("akiec", "bcc", "mel")
PREPROCESSING_MODES = ("inception", "densenet")
RESIZE_METHODS = ("bilinear", "bicubic", "lanczos", "nearest")
COLOUR_CONSTANCY_METHODS = ("shades_of_gray",)
DEFAULT_BUNDLE = "ham10000-ensemble"
MODELS_ENV = "DERMSCORE_MODELS"
ENTRY_POINT_GROUP = "dermscore.bundles"
CALIBRATION_METHODS = ("temperature", "class-temperature")


@dataclass(frozen=True)
class OnnxFile:
    """A member's ONNX graph shipped in the bundle (written by ``python -m training onnx``), so scoring
    never exports on the user's machine. ``outputs`` names what the graph returns, in the words of
    ``dermscore.onnx_backend.outputs_of``; the backend uses the file only when that is what it needs."""

    file: str
    sha256: str
    outputs: str


@dataclass(frozen=True)
class Member:
    """One CNN of the ensemble and how an image must be prepared for it."""

    name: str
    architecture: str
    file: str
    sha256: str
    input_size: tuple[int, int]  # (height, width)
    preprocessing: str
    resize: str
    weight: float
    onnx: OnnxFile | None = None  # absent in bundles without shipped ONNX members: exported and cached


@dataclass(frozen=True)
class Calibration:
    """Temperature scaling of the ensemble's log-probabilities, fitted on validation by training/.

    ``temperatures`` holds one value (global temperature scaling: the ranking of the classes within an
    image never changes) or one per class (the per-class variant).
    """

    method: str
    temperatures: tuple[float, ...]


@dataclass(frozen=True)
class OodSpec:
    """The out-of-distribution detector: its statistics file (hashed like the weights) and threshold."""

    file: str
    sha256: str
    views: str  # how members average their features over views: "none" or "flips" (dermscore.features)
    threshold: float
    method: str


@dataclass(frozen=True)
class OperatingPoints:
    """Decision thresholds fitted on validation; each one the user does not override comes from here."""

    malignant: float | None = None
    review: float | None = None
    disagreement: float | None = None
    # Whether members whose top classes differ are flagged whatever their divergence (dermscore's rule
    # before fitted operating points; the shipped members differ on a third of images, too many to review).
    top_class_disagreement: bool | None = None
    # What the fitted thresholds gave on the test split (sensitivity, specificity, share flagged, ...),
    # shown in the workbook's Run sheet; figures only, never used to score.
    test_figures: dict[str, float] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class ColourConstancy:
    """The illuminant normalisation every member's input gets (manifest field ``colour_constancy``).

    Shades of Gray with Minkowski norm ``p`` (Finlayson & Trezzi 2004; the normalisation the leading
    ISIC 2018/2019 entries used): members trained on images whose light source and sensor tint were
    divided out depend less on the dermoscope that took them.
    """

    method: str
    p: float

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "p": self.p}


@dataclass(frozen=True)
class Bundle:
    """A parsed manifest plus where it lives; weights are loaded by ``dermscore.infer``."""

    path: Path
    name: str
    version: str
    classes: tuple[str, ...]
    malignant_classes: tuple[str, ...]
    members: tuple[Member, ...]
    intended_use: str
    provenance: dict[str, Any] = field(default_factory=dict)
    calibration: Calibration | None = None
    ood: OodSpec | None = None
    operating_points: OperatingPoints = OperatingPoints()
    colour_constancy: ColourConstancy | None = None  # None: images go to the members as decoded (older bundles)

    def member_path(self, member: Member) -> Path:
        return self.path / member.file

    @property
    def weight_hashes(self) -> dict[str, str]:
        return {m.name: m.sha256 for m in self.members}

    @property
    def identity(self) -> str:
        """One string that changes whenever the bundle's outputs could change (used by the ledger)."""
        digest = hashlib.sha256()
        for member in self.members:
            digest.update(f"{member.name}:{member.sha256}:{member.weight}:{member.input_size}".encode())
        if self.colour_constancy is not None:  # absent: the identity of a bundle made before the field existed
            digest.update(f"colour_constancy:{self.colour_constancy.method}:{self.colour_constancy.p}".encode())
        # What changes scores besides the weights; absent in older bundles, whose identity stays as it was.
        fitted = self.operating_points if self.operating_points != OperatingPoints() else None
        for extra in (self.calibration, self.ood, fitted):
            if extra is not None:
                digest.update(repr(extra).encode())
        return f"{self.name}@{self.version}#{digest.hexdigest()[:16]}"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def models_dir() -> Path:
    """Where this installation's own bundles live: ``$DERMSCORE_MODELS``, else the package's models folder.

    Training's export writes here by default.
    """
    env = os.environ.get(MODELS_ENV)
    return Path(env) if env else packaged_models_dir()


def packaged_models_dir() -> Path:
    """The bundles that travel with dermscore: ``dermscore/models`` in a wheel (setuptools maps the
    repository's top-level ``models/`` there), else the checkout's ``models/`` (editable install or a
    source tree), which stays where training writes it."""
    package = Path(__file__).resolve().parent
    installed = package / "models"
    return installed if installed.is_dir() else package.parent / "models"


@dataclass(frozen=True)
class BundleSource:
    """A folder of bundle folders and how it was found (shown by ``dermscore models``)."""

    folder: Path
    origin: str


def bundle_sources() -> Iterator[BundleSource]:
    """Where bundles are looked for, in order; the first bundle of a name wins.

    ``$DERMSCORE_MODELS``, when set, is the only place: a site pins exactly the bundles it validated.
    Otherwise the package's own bundles, then those other distributions register under the
    ``dermscore.bundles`` entry point (each names a package whose folder holds bundle folders). Entry
    points are imported lazily, so a broken one matters only when a bundle is not found before it.
    """
    env = os.environ.get(MODELS_ENV)
    if env:
        yield BundleSource(Path(env), MODELS_ENV)
        return
    yield BundleSource(packaged_models_dir(), "package")
    from importlib.metadata import entry_points
    from importlib.resources import files

    for point in entry_points(group=ENTRY_POINT_GROUP):
        distribution = point.dist.name if point.dist else "unknown distribution"
        try:
            folder = files(point.module)
        except (ImportError, TypeError) as exc:
            raise BundleError(
                f"entry point {point.name} = {point.value!r} of {distribution} in group {ENTRY_POINT_GROUP} "
                f"cannot be imported ({exc}); reinstall or uninstall {distribution}."
            ) from exc
        if not isinstance(folder, Path):
            raise BundleError(f"entry point {point.name} of {distribution}: {folder} is not a plain folder "
                              "(a zipped or namespace package); make it a regular package installed as files.")
        yield BundleSource(folder, f"entry point {point.name} ({distribution})")


def _require(manifest: dict[str, Any], key: str, where: Path) -> Any:
    if key not in manifest:
        raise BundleError(f"{where}: manifest has no '{key}'. Re-export the bundle with training/ or fix the file.")
    return manifest[key]


def _parse_member(raw: dict[str, Any], where: Path) -> Member:
    size = _require(raw, "input_size", where)
    if not (isinstance(size, list | tuple) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
        raise BundleError(f"{where}: member input_size must be [height, width] in pixels, got {size!r}.")
    preprocessing = _require(raw, "preprocessing", where)
    if preprocessing not in PREPROCESSING_MODES:
        raise BundleError(
            f"{where}: member preprocessing {preprocessing!r} is unknown; expected one of {PREPROCESSING_MODES}."
        )
    resize = raw.get("resize", "bilinear")
    if resize not in RESIZE_METHODS:
        raise BundleError(f"{where}: member resize {resize!r} is unknown; expected one of {RESIZE_METHODS}.")
    weight = float(raw.get("weight", 1.0))
    if weight < 0:
        raise BundleError(f"{where}: member weight must be >= 0, got {weight}.")
    onnx = raw.get("onnx")
    return Member(
        name=str(_require(raw, "name", where)),
        architecture=str(_require(raw, "architecture", where)),
        file=str(_require(raw, "file", where)),
        sha256=str(_require(raw, "sha256", where)).lower(),
        input_size=(size[0], size[1]),
        preprocessing=preprocessing,
        resize=resize,
        weight=weight,
        onnx=None if onnx is None else OnnxFile(
            file=str(_require(onnx, "file", where)),
            sha256=str(_require(onnx, "sha256", where)).lower(),
            outputs=str(_require(onnx, "outputs", where)),
        ),
    )


def _probability(raw: dict[str, Any], key: str, where: Path) -> float | None:
    value = raw.get(key)
    if value is None:
        return None
    if not (isinstance(value, int | float) and 0.0 <= value <= 1.0):
        raise BundleError(f"{where}: {key} must be a probability between 0 and 1, got {value!r}.")
    return float(value)


def _parse_calibration(raw: Any, classes: int, where: Path) -> Calibration | None:
    if raw is None:
        return None
    method = str(_require(raw, "method", where))
    value = _require(raw, "temperature", where)
    temperatures = tuple(float(t) for t in (value if isinstance(value, list) else [value]))
    if method not in CALIBRATION_METHODS or len(temperatures) not in (1, classes) or min(temperatures) <= 0:
        raise BundleError(
            f"{where}: calibration must be one of {CALIBRATION_METHODS} with a positive temperature "
            f"(one, or one per class), got {raw!r}. Refit it with `python -m training calibrate`."
        )
    return Calibration(method, temperatures)


def _parse_ood(raw: Any, where: Path) -> OodSpec | None:
    if raw is None:
        return None
    return OodSpec(
        file=str(_require(raw, "file", where)),
        sha256=str(_require(raw, "sha256", where)).lower(),
        views=str(raw.get("views", "none")),
        threshold=float(_require(raw, "threshold", where)),
        method=str(_require(raw, "method", where)),
    )


def _parse_operating_points(raw: Any, where: Path) -> OperatingPoints:
    raw = raw or {}
    thresholds = (_probability(raw, f"{k}_threshold", where) for k in ("malignant", "review", "disagreement"))
    figures = {k: float(v) for k, v in (raw.get("test") or {}).items() if isinstance(v, int | float)}
    top_class = raw.get("members_disagree_on_top_class")
    return OperatingPoints(*thresholds, top_class_disagreement=None if top_class is None else bool(top_class),
                           test_figures=figures)


def _parse_colour_constancy(raw: Any, where: Path) -> ColourConstancy | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or raw.get("method") not in COLOUR_CONSTANCY_METHODS:
        raise BundleError(
            f"{where}: colour_constancy must be an object with method one of {COLOUR_CONSTANCY_METHODS}, got {raw!r}. "
            "Re-export the bundle with training/ or use a dermscore version that knows the method."
        )
    p = raw.get("p")
    if isinstance(p, bool) or not isinstance(p, int | float) or not 1 <= p <= 64:
        raise BundleError(f"{where}: colour_constancy p (the Minkowski norm) must be a number from 1 to 64, got {p!r}.")
    return ColourConstancy(method=raw["method"], p=float(p))


def read_bundle(path: Path | str) -> Bundle:
    """Parse and validate a manifest without touching the weight files (cheap: for listings)."""
    folder = Path(path)
    manifest_path = folder / MANIFEST if folder.is_dir() else folder
    folder = manifest_path.parent
    if not manifest_path.is_file():
        raise BundleError(f"{folder}: no {MANIFEST} here, so this is not a dermscore model bundle.")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{manifest_path}: cannot read the manifest ({exc}).") from exc
    classes = tuple(_require(manifest, "classes", manifest_path))
    malignant = tuple(manifest.get("malignant_classes", DEFAULT_MALIGNANT))
    unknown = set(malignant) - set(classes)
    if unknown:
        raise BundleError(f"{manifest_path}: malignant_classes {sorted(unknown)} are not among classes {classes}.")
    members = tuple(_parse_member(m, manifest_path) for m in _require(manifest, "members", manifest_path))
    if not members:
        raise BundleError(f"{manifest_path}: a bundle needs at least one member.")
    if sum(m.weight for m in members) <= 0:
        raise BundleError(f"{manifest_path}: member weights sum to zero.")
    if len({m.name for m in members}) != len(members):
        raise BundleError(f"{manifest_path}: member names must be unique.")
    return Bundle(
        path=folder,
        name=str(_require(manifest, "name", manifest_path)),
        version=str(_require(manifest, "version", manifest_path)),
        classes=classes,
        malignant_classes=malignant,
        members=members,
        intended_use=str(manifest.get("intended_use", "")),
        provenance=dict(manifest.get("provenance", {})),
        calibration=_parse_calibration(manifest.get("calibration"), len(classes), manifest_path),
        ood=_parse_ood(manifest.get("ood"), manifest_path),
        operating_points=_parse_operating_points(manifest.get("operating_points"), manifest_path),
        colour_constancy=_parse_colour_constancy(manifest.get("colour_constancy"), manifest_path),
    )


def verify_bundle(bundle: Bundle) -> None:
    """Refuse any member (ONNX, OOD statistics) file that is missing or whose sha256 differs from the manifest."""
    files = [(bundle.member_path(m), m.sha256, f"weight file of member '{m.name}'") for m in bundle.members]
    files += [(bundle.path / m.onnx.file, m.onnx.sha256, f"ONNX file of member '{m.name}'")
              for m in bundle.members if m.onnx is not None]
    if bundle.ood is not None:
        files.append((bundle.path / bundle.ood.file, bundle.ood.sha256, "OOD statistics file"))
    for file, expected, what in files:
        if not file.is_file():
            raise BundleError(f"{file}: {what} is missing from bundle {bundle.name}.")
        actual = sha256_file(file)
        if actual != expected:
            raise BundleError(
                f"{file}: sha256 {actual} does not match {expected} recorded in {MANIFEST}; "
                f"the {what} was changed or damaged. Reinstall or retrain the bundle; never edit the hash."
            )


def resolve_bundle(spec: str | Path | None) -> Path:
    """Turn ``--model`` (a folder, or an installed bundle's name) into a folder; None means the default."""
    if spec is not None and Path(spec).exists():
        return Path(spec)
    name = DEFAULT_BUNDLE if spec is None else str(spec)
    searched = []
    for source in bundle_sources():
        if (source.folder / name / MANIFEST).is_file():
            return source.folder / name
        searched.append(f"{source.folder} ({source.origin})")
    if spec is None:
        raise BundleError(
            f"No default model bundle is installed (looked for {name}/{MANIFEST} in {', '.join(searched)}). "
            "Pass --model PATH to a bundle folder, set DERMSCORE_MODELS to a folder of bundles, "
            "or train one with `python -m training all` (see README, 'Training')."
        )
    raise BundleError(f"Model bundle {spec!r} not found as a folder or as a bundle name in {', '.join(searched)}.")


def load_bundle(spec: str | Path | None = None) -> Bundle:
    """Resolve, parse and verify a bundle; the only way scoring code should obtain one."""
    bundle = read_bundle(resolve_bundle(spec))
    verify_bundle(bundle)
    return bundle


def list_bundles(root: Path | None = None) -> list[Bundle]:
    """The bundles in one folder of bundle folders (default: ``models_dir()``)."""
    root = root or models_dir()
    if not root.is_dir():
        return []
    return [read_bundle(p.parent) for p in sorted(root.glob(f"*/{MANIFEST}"))]


def installed_bundles() -> list[tuple[Bundle, BundleSource]]:
    """Every bundle in every place ``bundle_sources`` names, in search order (a later one of the same
    name is shadowed: ``--model NAME`` takes the first)."""
    return [(bundle, source) for source in bundle_sources() for bundle in list_bundles(source.folder)]


def write_manifest(folder: Path, manifest: dict[str, Any]) -> Bundle:
    """Write ``bundle.json`` with each member's sha256 computed from its file, then read it back.

    Training's export calls this, so hashes are never typed by hand.
    """
    folder = Path(folder)
    manifest = dict(manifest)
    manifest.setdefault("format_version", FORMAT_VERSION)
    manifest.setdefault("classes", list(CLASS_CODES))
    manifest.setdefault("malignant_classes", list(DEFAULT_MALIGNANT))
    members = []
    for raw in manifest["members"]:
        raw = dict(raw)
        raw["sha256"] = sha256_file(folder / raw["file"])
        if raw.get("onnx"):
            raw["onnx"] = {**raw["onnx"], "sha256": sha256_file(folder / raw["onnx"]["file"])}
        raw["input_size"] = list(raw["input_size"])
        members.append(raw)
    manifest["members"] = members
    if manifest.get("ood"):
        manifest["ood"] = {**manifest["ood"], "sha256": sha256_file(folder / manifest["ood"]["file"])}
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    tmp.replace(folder / MANIFEST)
    bundle = read_bundle(folder)
    verify_bundle(bundle)
    return bundle
