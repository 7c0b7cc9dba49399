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
        return f"{self.name}@{self.version}#{digest.hexdigest()[:16]}"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def models_dir() -> Path:
    """Where shipped bundles live: ``$DERMSCORE_MODELS``, else the project's top-level ``models/``."""
    env = os.environ.get(MODELS_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "models"


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
    return Member(
        name=str(_require(raw, "name", where)),
        architecture=str(_require(raw, "architecture", where)),
        file=str(_require(raw, "file", where)),
        sha256=str(_require(raw, "sha256", where)).lower(),
        input_size=(size[0], size[1]),
        preprocessing=preprocessing,
        resize=resize,
        weight=weight,
    )


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
        colour_constancy=_parse_colour_constancy(manifest.get("colour_constancy"), manifest_path),
    )


def verify_bundle(bundle: Bundle) -> None:
    """Refuse any member whose file is missing or whose sha256 differs from the manifest."""
    for member in bundle.members:
        file = bundle.member_path(member)
        if not file.is_file():
            raise BundleError(f"{file}: weight file of member '{member.name}' is missing from bundle {bundle.name}.")
        actual = sha256_file(file)
        if actual != member.sha256:
            raise BundleError(
                f"{file}: sha256 {actual} does not match {member.sha256} recorded in {MANIFEST}; "
                "the weights were changed or damaged. Reinstall or retrain the bundle; never edit the hash."
            )


def resolve_bundle(spec: str | Path | None) -> Path:
    """Turn ``--model`` (a folder, or a bundle name under models/) into a folder; None means the default."""
    if spec is None:
        folder = models_dir() / DEFAULT_BUNDLE
        if not (folder / MANIFEST).is_file():
            raise BundleError(
                f"No default model bundle is installed (looked for {folder / MANIFEST}). "
                "Pass --model PATH to a bundle folder, set DERMSCORE_MODELS to a folder of bundles, "
                "or train one with `python -m training all` (see README, 'Training')."
            )
        return folder
    folder = Path(spec)
    if folder.exists():
        return folder
    named = models_dir() / str(spec)
    if (named / MANIFEST).is_file():
        return named
    raise BundleError(f"Model bundle {spec!r} not found as a folder or as a bundle name under {models_dir()}.")


def load_bundle(spec: str | Path | None = None) -> Bundle:
    """Resolve, parse and verify a bundle; the only way scoring code should obtain one."""
    bundle = read_bundle(resolve_bundle(spec))
    verify_bundle(bundle)
    return bundle


def list_bundles(root: Path | None = None) -> list[Bundle]:
    root = root or models_dir()
    if not root.is_dir():
        return []
    return [read_bundle(p.parent) for p in sorted(root.glob(f"*/{MANIFEST}"))]


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
        raw["input_size"] = list(raw["input_size"])
        members.append(raw)
    manifest["members"] = members
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    tmp.replace(folder / MANIFEST)
    bundle = read_bundle(folder)
    verify_bundle(bundle)
    return bundle
