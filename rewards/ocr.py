"""OCR accuracy reward with rapidocr (PP-OCR ONNX models shipped inside the rapidocr wheel, offline)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .text_match import extract_target, ocr_accuracy

# The model files that rapidocr 3.10 ships in its wheel. They are passed by path so that rapidocr
# never takes its download branch. PP-OCRv6 "small" is multilingual: it reads English and Chinese.
_DET_MODEL = "PP-OCRv6_det_small.onnx"
_REC_MODEL = "PP-OCRv6_rec_small.onnx"
_CLS_MODEL = "ch_ppocr_mobile_v2.0_cls_mobile.onnx"


def build_rapidocr(det_limit_side_len: int = 960, use_cls: bool = False, text_score: float = 0.5,
                   num_threads: int | None = None, model_dir: str | Path | None = None,
                   params: dict[str, Any] | None = None) -> Any:
    """Build a `rapidocr.RapidOCR` engine that works offline and does not upscale small images.

    Detection resizes by the longest side (`Det.limit_type="max"`): images are shrunk to at most
    `det_limit_side_len` and never enlarged (rapidocr's default, `"min"` with 736, blows a 64x256
    image up to 736 pixels high, which is slow and less accurate).

    Args:
        det_limit_side_len (`int`, defaults to 960): longest side fed to the detector.
        use_cls (`bool`, defaults to `False`): run the 0/180 degree line classifier (generated
            images are upright; it costs time and sometimes flips short lines).
        text_score (`float`, defaults to 0.5): lines recognised with a lower confidence are dropped.
        num_threads (`int`, *optional*): onnxruntime intra-op threads; default: all cores.
        model_dir (`str`, *optional*): folder holding the three ONNX files; default: the wheel's.
        params (`dict`, *optional*): extra `RapidOCR(params=...)` entries, applied last.
    """
    import rapidocr

    root = Path(model_dir) if model_dir is not None else Path(rapidocr.__file__).parent / "models"
    paths = {name: root / name for name in (_DET_MODEL, _REC_MODEL, _CLS_MODEL)}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"rapidocr model files not found: {missing} (rapidocr==3.10 ships them in its wheel)")
    cfg: dict[str, Any] = {
        "Global.log_level": "error",  # "detection result is empty" on every blank image otherwise
        "Global.use_cls": use_cls,
        "Global.text_score": text_score,
        "Det.model_path": str(paths[_DET_MODEL]),
        "Rec.model_path": str(paths[_REC_MODEL]),
        "Cls.model_path": str(paths[_CLS_MODEL]),
        "Det.limit_type": "max",
        "Det.limit_side_len": det_limit_side_len,
    }
    if num_threads is not None:
        cfg["EngineConfig.onnxruntime.intra_op_num_threads"] = num_threads
    cfg.update(params or {})
    return rapidocr.RapidOCR(params=cfg)


def _to_pil_rgb(image: Any) -> Image.Image:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image or a uint8 array, got {type(image).__name__}")
    return image if image.mode == "RGB" else image.convert("RGB")


class OCRReward:
    """Reward for rendering the requested text: `1 - d / len(g)` (see `rlhf_image.rewards.text_match`).

    The target of each sample is the `target_column` value when it is a non-blank string, else the
    quoted span(s) of the prompt (`extract_target`). A sample with neither gets `None`; a blank
    image scores 0. Images are read one by one (rapidocr has no batched det+rec path); the engine is
    guarded by a lock because rapidocr keeps per-call flags on the instance.

    Args:
        name (`str`, defaults to `"ocr"`).
        target_column (`str`, defaults to `"target_text"`): dataset column holding the target.
        use_det (`bool`, defaults to `True`): `False` is recognition only, for images that hold a
            single text line (tiny demo renders): faster, and it cannot miss a line the detector drops.
        rec_min_height (`int`, defaults to 48): in recognition-only mode images lower than this are
            upscaled (bicubic) first; 48 is the recogniser's input height.
        det_limit_side_len, use_cls, text_score, num_threads, model_dir, params: see `build_rapidocr`.

    Example:
        >>> ocr = OCRReward()
        >>> ocr(['a sign that says "OPEN"'], [image])
        [1.0]
    """

    def __init__(self, *, name: str = "ocr", target_column: str = "target_text", use_det: bool = True,
                 rec_min_height: int | None = 48, det_limit_side_len: int = 960, use_cls: bool = False,
                 text_score: float = 0.5, num_threads: int | None = None, model_dir: str | Path | None = None,
                 params: dict[str, Any] | None = None):
        self.name = name
        self.target_column = target_column
        self.use_det = use_det
        self.use_cls = use_cls
        self.rec_min_height = rec_min_height
        self.text_score = text_score
        self._engine_kwargs = dict(det_limit_side_len=det_limit_side_len, use_cls=use_cls, text_score=text_score,
                                   num_threads=num_threads, model_dir=model_dir, params=params)
        self._lock = threading.Lock()
        self._engine = build_rapidocr(**self._engine_kwargs)

    def __getstate__(self) -> dict[str, Any]:
        # ONNX sessions and locks do not pickle; a copy sent to a Ray worker rebuilds its engine.
        state = self.__dict__.copy()
        state.pop("_engine")
        state.pop("_lock")
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._engine = build_rapidocr(**self._engine_kwargs)

    def read(self, image: Any) -> str:
        """OCR one image; the recognised lines joined with a space (`""` when nothing is read)."""
        image = _to_pil_rgb(image)
        if not self.use_det and self.rec_min_height and image.height < self.rec_min_height:
            scale = self.rec_min_height / image.height
            image = image.resize((max(1, round(image.width * scale)), self.rec_min_height), Image.BICUBIC)
        with self._lock:
            # Pass the flags on every call: rapidocr stores them on the engine for later calls.
            out = self._engine(image, use_det=self.use_det, use_cls=self.use_cls, use_rec=True)
        txts = getattr(out, "txts", None) or ()
        scores = getattr(out, "scores", None) or (1.0,) * len(txts)
        # Recognition-only output skips rapidocr's confidence filter (noise reads as low-score text).
        return " ".join(t for t, s in zip(txts, scores) if t.strip() and s >= self.text_score)

    def ocr_text(self, images: Sequence[Any]) -> list[str]:
        """OCR a batch: `list[str]` of length N, for evaluation (word accuracy, `normalized_edit_distance`)."""
        return [self.read(image) for image in images]

    def targets(self, prompts: Sequence[str], **columns: Any) -> list[str | None]:
        """The target text of each sample: the column value if it is a non-blank string, else the prompt's quotes."""
        column = columns.get(self.target_column)
        out: list[str | None] = []
        for i, prompt in enumerate(prompts):
            value = column[i] if column is not None else None
            out.append(value.strip() if isinstance(value, str) and value.strip() else extract_target(prompt))
        return out

    def __call__(self, prompts: list[str], images: list[Any], **columns: Any) -> list[float | None]:
        """Score a batch.

        Args:
            prompts (`list[str]` of length N).
            images (`list[PIL.Image.Image]` of length N).
            **columns: `target_column` (`list[str | None]` of length N) if present; others are ignored.

        Returns:
            `list[float | None]` of length N, each in [0, 1]; `None` where the sample has no target.
        """
        if len(images) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(images)} images")
        return [None if target is None else ocr_accuracy(self.read(image), target)
                for target, image in zip(self.targets(prompts, **columns), images)]
