"""Eval sets: the common `EvalSet` of images and texts, and one loader per benchmark's on-disk format."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from recaption.errors import InputError

# An image is named by its path, held in memory, or made on demand (generated scenes, archive members).
ImageRef = str | Path | Image.Image | Callable[[], Image.Image]


@dataclass
class EvalSet:
    """A retrieval eval set: `texts[t]` describes `images[text_to_image[t]]`; an image may have several texts."""

    name: str
    images: list[ImageRef]
    texts: list[str]
    text_to_image: list[int]

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.text_to_image):
            raise ValueError(f"{self.name}: {len(self.texts)} texts but {len(self.text_to_image)} text_to_image")
        if self.text_to_image and not 0 <= min(self.text_to_image) <= max(self.text_to_image) < len(self.images):
            raise ValueError(f"{self.name}: text_to_image points outside the {len(self.images)} images")

    def head(self, n: int) -> EvalSet:
        """The first n images and their texts (ShareGPT4V-1k is the first 1000 of the 10k)."""
        keep = [t for t, i in enumerate(self.text_to_image) if i < n]
        return EvalSet(self.name, self.images[:n], [self.texts[t] for t in keep], [self.text_to_image[t] for t in keep])


def open_image(ref: ImageRef) -> Image.Image:
    """The RGB image a reference names; a missing or broken file is an InputError naming the path."""
    if isinstance(ref, Image.Image):
        img = ref
    elif callable(ref):
        img = ref()
    else:
        try:
            with Image.open(ref) as f:
                img = f.convert("RGB")
        except (OSError, ValueError) as e:
            raise InputError(f"cannot read image {ref}: {e}") from None
    return img if img.mode == "RGB" else img.convert("RGB")


def long_caption(text: str) -> str:
    """LoTLIP's cleaning of a long caption before tokenising: cut at newlines, `</s>` and full stops, drop empty
    pieces, join with '. ' (so paragraphs become one line of sentences; the final full stop goes)."""
    return ". ".join(p.strip() for p in re.split(r"\n|</s>|[.]", text) if p.strip())


def concat_eval_sets(name: str, sets: Sequence[EvalSet]) -> EvalSet:
    """One eval set from several (LoTLIP's IIW is its DOCCI, IIW-400 and DCI test subsets together)."""
    images: list[ImageRef] = []
    texts, owner = [], []
    for s in sets:
        owner += [len(images) + i for i in s.text_to_image]
        texts += s.texts
        images += s.images
    return EvalSet(name, images, texts, owner)


def load_sharegpt4v(
    json_path: str | Path, image_root: str | Path, limit: int | None = 1000, normalize: bool = True, name: str = ""
) -> EvalSet:
    """ShareGPT4V-1k / -10k, as Long-CLIP and LoTLIP evaluate it: the first `limit` entries of a ShareGPT4V json.

    On disk: a JSON list (e.g. `share-captioner_coco_lcs_sam_1246k_1107.json`, or LoTLIP's resaved
    `share4v_sam_10k.json`) of `{"image": "<path relative to image_root>", "conversations": [{"from": "human",
    "value": "<image>\\n..."}, {"from": "gpt", "value": "<long caption>"}]}`; the caption is the first `gpt`
    turn. One caption per image. `normalize` applies LoTLIP's `long_caption` cleaning.
    """
    entries = _read_json(json_path)
    if not isinstance(entries, list):
        raise InputError(f"{json_path}: expected a JSON list of {{image, conversations}} entries")
    entries = entries[:limit] if limit else entries
    images, texts = [], []
    for i, e in enumerate(entries):
        try:
            turns = e["conversations"]
            caption = next((t["value"] for t in turns if t.get("from") == "gpt"), turns[1]["value"])
            images.append(Path(image_root) / e["image"])
        except (KeyError, IndexError, TypeError):
            raise InputError(f"{json_path}: entry {i} lacks `image` or a `gpt` turn in `conversations`") from None
        texts.append(long_caption(caption) if normalize else caption.replace("\n", " ").strip())
    return _one_text_each(name or f"sharegpt4v-{len(images)}", images, texts)


def load_dci(root: str | Path, text: str = "long", splits: Sequence[str] | None = None, name: str = "") -> EvalSet:
    """DCI (Densely Captioned Images) as LoTLIP evaluates it: every image of every split in splits.json.

    On disk (`root` is the folder holding `densely_captioned_images/`, or that folder itself):
    `splits.json` = {split: [annotation file names]}; `annotations/<file>` = {"image": "<file in photos/>",
    "short_caption": ..., "extra_caption": ..., "summaries": {"base": [LLM summaries], ...}, "mask_data": ...};
    `photos/<image>`.

    `text`: "long" is LoTLIP's text, short_caption + newline + extra_caption cleaned by `long_caption`;
    "short" is the short caption alone; "summary" gives each image all its `summaries.base` texts (sDCI).
    """
    base = Path(root)
    if not (base / "splits.json").is_file():
        base = base / "densely_captioned_images"
    split_map = _read_json(base / "splits.json")
    files = [f for split, fs in split_map.items() if splits is None or split in splits for f in fs]
    images: list[ImageRef] = []
    texts, owner = [], []
    for f in files:
        a = _read_json(base / "annotations" / f)
        if text == "long":
            captions = [long_caption(f"{a['short_caption']}\n{a['extra_caption']}")]
        elif text == "short":
            captions = [a["short_caption"].strip()]
        elif text == "summary":
            captions = [s.strip() for s in a.get("summaries", {}).get("base", [])]
        else:
            raise ValueError(f"DCI text must be long, short or summary, not {text!r}")
        owner += [len(images)] * len(captions)
        texts += captions
        images.append(base / "photos" / a["image"])
    _check_images(base, images)
    return EvalSet(name or f"dci-{text}", images, texts, owner)


def load_iiw(
    jsonl_path: str | Path, image_dir: str | Path, text_key: str = "IIW", normalize: bool = True, name: str = ""
) -> EvalSet:
    """One ImageInWords subset (IIW-400, DCI_Test, DOCCI_Test), as LoTLIP reads it.

    On disk: `data.jsonl`, one JSON object per line with the description under `text_key` ("IIW"; DOCCI_Test
    also has "DOCCI") and the image name under "image" or "image/key"; ".jpg" is appended when the name has no
    image suffix (.jpg, .png, …). Images are `image_dir/<name>.jpg` (LoTLIP copies them to iiw_root/{docci_aar,dci,docci}). LoTLIP's IIW
    number is the three subsets as one set: list three paths in the eval config.
    """
    images, texts = [], []
    for i, line in enumerate(_read_text(jsonl_path).splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            key = row["image"] if "image" in row else row["image/key"]
            caption = row[text_key]
            if not isinstance(key, str) or not isinstance(caption, str):
                raise TypeError
        except (json.JSONDecodeError, KeyError, TypeError):
            raise InputError(f"{jsonl_path}:{i + 1}: expected JSON with {text_key!r} and image or image/key") from None
        has_suffix = Path(key).suffix.lower() in IMAGE_SUFFIXES
        images.append(Path(image_dir) / (key if has_suffix else f"{key}.jpg"))
        texts.append(long_caption(caption) if normalize else caption.strip())
    return _one_text_each(name or f"iiw-{Path(jsonl_path).parent.name}", images, texts)


def load_urban1k(root: str | Path, normalize: bool = True, name: str = "urban1k") -> EvalSet:
    """Urban1k (Long-CLIP's benchmark). On disk: `root/caption/<stem>.txt` whose first line is the caption of
    `root/image/<stem>.jpg`; as in Long-CLIP and LoTLIP, captions are listed and images found by name."""
    root = Path(root)
    caption_dir = root / "caption"
    if not caption_dir.is_dir():
        raise InputError(f"{root}: expected caption/ and image/ folders (Urban1k layout)")
    images, texts = [], []
    for f in sorted(caption_dir.glob("*.txt")):
        lines = f.read_text(encoding="utf-8").splitlines()
        caption = lines[0] if lines else ""
        images.append(root / "image" / f"{f.stem}.jpg")
        texts.append(long_caption(caption) if normalize else caption.strip())
    return _one_text_each(name, images, texts)


def load_karpathy(json_path: str | Path, image_root: str | Path, split: str = "test", name: str = "") -> EvalSet:
    """COCO or Flickr30k in Karpathy's split (`dataset_coco.json`, `dataset_flickr30k.json`): 5k / 1k test images
    with about 5 captions each.

    On disk: {"images": [{"filepath": "val2014" (COCO only), "filename": ..., "split": "train" | "restval" |
    "val" | "test", "sentences": [{"raw": caption, "tokens": [...]}, ...]}, ...]}. Images are
    `image_root/<filepath>/<filename>`, or `image_root/<filename>` when there is no filepath.
    """
    data = _read_json(json_path)
    rows = [(i, r) for i, r in enumerate(data.get("images", [])) if r.get("split") == split]
    if not rows:
        raise InputError(f"{json_path}: no images with split {split!r}")
    images: list[ImageRef] = []
    texts, owner = [], []
    for i, r in rows:
        entry = f"{json_path}: images[{i}] ({r.get('filename', 'no filename')})"
        sentences = r.get("sentences")
        if not isinstance(sentences, list) or not all(isinstance(s, dict) and "raw" in s for s in sentences):
            raise InputError(f"{entry} has no 'sentences' list of {{'raw': caption}} objects")
        if "filename" not in r:
            raise InputError(f"{entry} has no 'filename'")
        for s in sentences:
            texts.append(s["raw"].strip())
            owner.append(len(images))
        images.append(Path(image_root) / r.get("filepath", "") / r["filename"])
    _check_images(json_path, images)
    return EvalSet(name or f"{data.get('dataset', Path(json_path).stem)}-{split}", images, texts, owner)


def load_synthetic(
    n: int, seed: int = 1_000_000, text: str = "long", size: int = 96, name: str = "", scene_text: bool = True
) -> EvalSet:
    """Generated multi-object scenes (`recaption.eval.synthetic`) with their long (every object, and the written
    word) or short (main object) caption; scene i comes from seed + i, and its image is drawn again when needed, not
    kept. `scene_text=False`: scenes without a written word (a word needs `size` 56 or more)."""
    from recaption.eval.synthetic import make_scene

    if text not in ("long", "short"):
        raise ValueError(f"synthetic text must be long or short, not {text!r}")
    scenes = [make_scene(seed + i, size=size, text=scene_text) for i in range(n)]
    texts = [s.long_caption if text == "long" else s.short_caption for s in scenes]
    images: list[ImageRef] = [functools.partial(_scene_image, seed + i, size, scene_text) for i in range(n)]
    return EvalSet(name or f"synthetic-{text}", images, texts, list(range(n)))


def _scene_image(seed: int, size: int, scene_text: bool = True) -> Image.Image:
    from recaption.eval.synthetic import make_scene

    return make_scene(seed, size=size, text=scene_text).image


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


@dataclass
class ClassificationSet:
    """A labelled image set for zero-shot classification: `images[i]` shows class `class_names[labels[i]]`."""

    name: str
    images: list[ImageRef]
    labels: list[int]
    class_names: list[str]


def load_image_folder(root: str | Path, class_names: str | Path | None = None, name: str = "") -> ClassificationSet:
    """ImageNet-style folders (torchvision's ImageFolder layout).

    On disk: `root/<class>/<image>` with one directory per class; files with an image suffix (.jpg, .JPEG,
    .png, …) anywhere under a class directory belong to it. Classes are the directory names in sorted order,
    so label i is the i-th name.

    The prompt text of a class is its directory name with `_` read as a space, unless `class_names` names a
    file: a JSON object {directory: name} (e.g. ImageNet's wnid → "goldfish"), a JSON list, or a text file with
    one name per line, both in sorted-directory order.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"image folder not found: {root}")
    dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not dirs:
        raise InputError(f"{root}: no class directories (expected root/<class>/<image>)")
    images: list[ImageRef] = []
    labels: list[int] = []
    for label, d in enumerate(dirs):
        files = sorted(p for p in d.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        images += files
        labels += [label] * len(files)
    if not images:
        raise InputError(f"{root}: the class directories hold no images")
    names = _class_names([d.name for d in dirs], class_names)
    return ClassificationSet(name or root.name, images, labels, names)


def _class_names(dirs: list[str], spec: str | Path | None) -> list[str]:
    if spec is None:
        return [d.replace("_", " ") for d in dirs]
    path = Path(spec)
    if path.suffix == ".json":
        data = _read_json(path)
        if isinstance(data, dict):
            missing = [d for d in dirs if d not in data]
            if missing:
                raise InputError(f"{path}: no name for class directories {missing[:5]}")
            return [str(data[d]) for d in dirs]
        names = [str(n) for n in data]
    else:
        names = [line.strip() for line in _read_text(path).splitlines() if line.strip()]
    if len(names) != len(dirs):
        raise InputError(f"{path}: {len(names)} class names for {len(dirs)} class directories")
    return names


def _one_text_each(name: str, images: list[ImageRef], texts: list[str]) -> EvalSet:
    _check_images(name, images)
    return EvalSet(name, images, texts, list(range(len(images))))


def _check_images(where: str | Path, images: Sequence[ImageRef]) -> None:
    """Fail before any model runs when image files are missing, naming one and the count."""
    missing = [p for p in images if isinstance(p, Path) and not p.is_file()]
    if missing:
        raise InputError(f"{where}: {len(missing)} of {len(images)} image files are missing, e.g. {missing[0]}")


def _read_text(path: str | Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}") from None


def _read_json(path: str | Path):
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON: {e}") from None
