"""Checks the workflow runs before any job, so a run that cannot finish stops at once with one line.

* the datasets a model is trained on (``train.datasets``) must fit the evaluated one (channels, tile size);
* listed plates (``images.plates``) must have a folder under ``images.root`` for folder layouts;
* ``model.pretrained: true`` needs the backbone's weights cached or given as a file, where they cannot be
  downloaded (before, that failed in ``train``, after every image job had run).
"""

from __future__ import annotations

from pathlib import Path

from .errors import ConfigError

# layouts whose plate is the first folder below images.root (unless images.plate names it)
FOLDER_LAYOUTS = ("phenix", "imagexpress")


def check_training_datasets(main: dict, others: dict[str, dict]) -> None:
    """Training datasets (train.datasets) must give the model what the evaluated dataset gives it."""
    for name, other in others.items():
        where = f"train.datasets: {name}"
        if name == main["dataset"]:
            raise ConfigError(f"{where} is the evaluated dataset itself; list only other datasets")
        if list(other["channels"]) != list(main["channels"]):
            raise ConfigError(
                f"{where} has channels {other['channels']}, the evaluated dataset {main['channels']}: "
                "the model sees channels in one order"
            )
        if other["tiles"]["size"] != main["tiles"]["size"]:
            raise ConfigError(
                f"{where} has tiles.size {other['tiles']['size']}, the evaluated dataset "
                f"{main['tiles']['size']}: the model is trained and embedded at one size"
            )
        if other["train"]["datasets"]:
            raise ConfigError(f"{where} itself lists train.datasets; nesting is not supported")


def check_plate_folders(config: dict) -> None:
    """Listed plates must exist as folders (folder layouts, images on disk, no images.plate)."""
    images = config["images"]
    if images["layout"] not in FOLDER_LAYOUTS or not images["plates"] or images.get("plate"):
        return
    root = Path(images["root"])
    if not root.is_dir():
        raise ConfigError(f"dataset {config['dataset']}: config key 'images.root': folder not found: {root}")
    missing = [p for p in images["plates"] if not (root / p).is_dir()]
    if missing:
        present = sorted(p.name for p in root.iterdir() if p.is_dir())[:10]
        raise ConfigError(
            f"dataset {config['dataset']}: config key 'images.plates' lists {len(missing)} plate(s) with no "
            f"folder under {root}, e.g. {missing[:5]}; folders there: {present}"
        )


def check_pretrained_weights(model: dict) -> None:
    """``model.pretrained: true`` needs the weights on disk (pretrained_file, or timm's cache) or a hub it
    can reach; offline that fails in a few seconds here instead of in the train job."""
    if not model.get("pretrained"):
        return
    if model.get("pretrained_file"):
        if not Path(model["pretrained_file"]).is_file():
            raise ConfigError(
                f"config key 'model.pretrained_file': {model['pretrained_file']} does not exist"
            )
        return
    from .model import _cached_weights, _require_reachable

    if _cached_weights(model["backbone"]) is None:
        _require_reachable(model["backbone"])
