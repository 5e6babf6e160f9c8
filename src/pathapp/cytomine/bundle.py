"""The App Engine task bundle: one zip holding `descriptor.yml` and the task's image as a
`docker save` tar, both at the archive's root.

How the App Engine reads it (cytomine/cytomine app-engine, `TaskService.uploadTask`): it streams
the zip's entries; an entry whose whole name matches `descriptor.(yml|yaml)` is the descriptor, an
entry ending in `.tar` is the image, pushed to its registry as `<namespace with '.' -> '/'>:<version>`,
both parsed from the tar's name split at its first '-' (so the name must be
`<namespace>-<version>.tar` and the namespace free of '-'). Its docs ("Task Docker image") build
the image tagged that same way and `docker save` it under that name; `configuration.image.file` in
the descriptor names it.
"""

from __future__ import annotations

import json
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import yaml

from pathapp.atomic import atomic_path
from pathapp.errors import PathappError


def image_reference(descriptor: dict[str, Any]) -> str:
    """The tag the image must carry: `org/pathapp/x:0.1.0` for namespace org.pathapp.x, version 0.1.0."""
    return f"{descriptor['namespace'].replace('.', '/')}:{descriptor['version']}"


def tar_name(descriptor: dict[str, Any]) -> str:
    return f"{descriptor['namespace']}-{descriptor['version']}.tar"


def read_descriptor(path: Path) -> dict[str, Any]:
    """descriptor.yml, checked for what the App Engine derives from names."""
    try:
        d = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        namespace, version, image_file = d["namespace"], d["version"], d["configuration"]["image"]["file"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as e:
        raise PathappError(f"{path}: not a task descriptor with namespace, version and "
                           f"configuration.image.file ({e}); use the repository's descriptor.yml") from None
    if "-" in namespace:
        raise PathappError(f"{path}: namespace {namespace!r} contains '-', but the App Engine splits the image "
                           "tar's name at its first '-'; use dots or underscores")
    if image_file.lstrip("/") != tar_name(d):
        raise PathappError(f"{path}: configuration.image.file is {image_file!r}; the App Engine expects "
                           f"'/{tar_name(d)}' (<namespace>-<version>.tar)")
    return d


def check_image_tar(image_tar: Path, reference: str) -> None:
    """A `docker save` archive (manifest.json) of the image tagged `reference`."""
    try:
        with tarfile.open(image_tar) as tar:
            manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
    except (OSError, tarfile.TarError, KeyError, ValueError) as e:
        raise PathappError(f"{image_tar}: not an image saved by `docker save` ({e}); "
                           f"run docker save {reference} -o {image_tar.name}") from None
    tags = [t for m in manifest for t in (m.get("RepoTags") or [])]
    if reference not in tags:
        raise PathappError(f"{image_tar}: the image is tagged {tags or 'nothing'}, not {reference!r}; "
                           f"build it with -t {reference} (the App Engine names it after the descriptor)")


def write_task_bundle(descriptor_path: Path, image_tar: Path, out_dir: Path) -> Path:
    """`<namespace>-<version>.zip` in `out_dir`: descriptor.yml and the image tar at the root."""
    d = read_descriptor(descriptor_path)
    check_image_tar(image_tar, image_reference(d))
    out = Path(out_dir) / f"{d['namespace']}-{d['version']}.zip"
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp, zipfile.ZipFile(tmp, "w") as z:
        z.write(descriptor_path, "descriptor.yml", compress_type=zipfile.ZIP_DEFLATED)
        z.write(image_tar, tar_name(d), compress_type=zipfile.ZIP_STORED)  # layers are compressed already
    return out
