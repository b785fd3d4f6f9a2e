"""A TFLite export that drops into MediaPipe Tasks, and MediaPipe's own check of it.

MediaPipe's ``ImageClassifier`` (Android, iOS, the web, Python) reads a model's TFLite Metadata:
the input's normalisation and colour space, and for each output the labels file. It reads the
outputs in the file's order and takes the first as the class scores: graftkit's files put them
first (``deploy.mend``) and the open-set score second, as a second "head" named ``ood_score`` with one
unnamed category, which a classifier app ignores unless it asks for it. The metadata is written by
MediaPipe's own writers (the ``mobile`` extra); without them the file is written as before,
with the outputs in the same order.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np

from graftkit.errors import ExportError
from graftkit.outputs.open_set import OOD_SCORE
from graftkit.quiet import silenced

PROBABILITIES = "probabilities"
# MediaPipe runs a file on its own build of TFLite: a float32 (or float16) file must give the
# TFLite interpreter's scores this closely; an int8 file within four steps of its output's 1/256
# scale (MediaPipe's build rounds some integer ops one step the other way, and a step inside
# the network can move the output by more: 3.9e-3 and 8.2e-3 seen). What the check catches, a
# file read with other pixels, order or outputs, moves scores by tenths.
MEDIAPIPE_TOLERANCE = {"none": 1e-4, "float16": 1e-4, "int8": 4 / 256}
INSTALL_HINT = "pip install 'graftkit[mobile]'"
HOW = ("MediaPipe Tasks vision.ImageClassifier: result.classifications[0] (head "
       "'probabilities') holds a score per class, labels from the file's metadata; "
       "classifications[1] (head 'ood_score'), where present, holds one category whose score is "
       "the open-set score. The classifier takes the image as it is and resizes it itself: give "
       "it the whole image, upright")


def available() -> bool:
    """Whether MediaPipe (the ``mobile`` extra) is installed, without importing it."""
    return importlib.util.find_spec("mediapipe") is not None


def add(path: Path, clf, open_set) -> str | None:
    """Write the metadata into the TFLite file at ``path``; None, or why it was not written
    (the file is a plain TFLite model then, which every TFLite interpreter still runs)."""
    if not available():
        return (f"MediaPipe is not installed, so the file has no TFLite Metadata: {INSTALL_HINT} "
                "and export again")
    try:
        path.write_bytes(with_metadata(path.read_bytes(), clf, open_set))
    except Exception as exc:  # a MediaPipe release whose writers changed: no metadata, said
        return (f"MediaPipe's metadata writer failed ({type(exc).__name__}: {exc}), so the file "
                "has no TFLite Metadata")
    return None


def with_metadata(model: bytes, clf, open_set) -> bytes:
    """``model`` with the TFLite Metadata MediaPipe Tasks reads: raw 0-255 RGB in (the model
    normalises inside), the class scores with their labels, and the ``ood_score`` head."""
    writer_module, info = _writers()
    labels = writer_module.Labels().add(list(clf.classes))
    ood_description = _ood_description(open_set)
    writer = writer_module.MetadataWriter.create(model)
    writer.add_general_info("graftkit image classifier", _description(clf))
    writer.add_image_input(norm_mean=[0.0], norm_std=[1.0],
                           color_space_type=info._metadata_fb.ColorSpaceType.RGB)
    writer.add_classification_output(labels, name=PROBABILITIES,
                                     description="a score per class, in labels.txt order")
    if ood_description is not None:
        # a feature output: a labels file of one name would make MediaPipe refuse the head
        writer.add_feature_output(name=OOD_SCORE, description=ood_description)
    written, _ = writer.populate()
    del writer  # its clean-up now: left to exit, it runs after the modules it needs are gone
    return bytes(written)


def _description(clf) -> str:
    size = clf.image_size
    text = (f"{len(clf.classes)} {'labels' if clf.multi_label else 'classes'}, trained by graftkit; "
            f"input: the whole image resized to {size}x{size}, RGB 0-255 (normalised inside)")
    if clf.multi_label:
        text += ("; one sigmoid per label: a label is given when its score reaches its threshold "
                 "(export.json labels.thresholds)")
    return text


def _ood_description(open_set) -> str | None:
    if open_set is None:
        return None
    described = open_set.describe()
    return (f"open-set score ({described['method']}): the image is none of the classes when "
            f"its score is above {described['threshold']:.6g}")


def check(built: Path, x: np.ndarray, outputs: dict, paths: list[str], classes: list[str],
          say: Callable[[str], None], no_metadata: str | None = None,
          quantize: str = "none") -> dict:
    """MediaPipe's ImageClassifier on the written file: on the check images at the model's size
    it must give what the TFLite interpreter gave; on the files themselves (its own decoding and
    resizing, as in an app) how close it comes is recorded."""
    if no_metadata is not None:
        return {"metadata": False, "why": no_metadata}
    say(f"checking it with MediaPipe's ImageClassifier on {len(x)} validation images...")
    try:
        with silenced():
            got = classify(built, x, len(classes))
            from_files = classify_files(built, paths, len(classes))
    except (RuntimeError, ValueError) as exc:
        raise ExportError(f"MediaPipe's ImageClassifier cannot run the TFLite file "
                          f"({type(exc).__name__}: {str(exc).strip()[:300]}); nothing was "
                          "written") from None
    ref = outputs["probabilities"]
    diff = {k: float(np.abs(got[k] - outputs[k]).max()) for k in got}
    same = float((got["probabilities"].argmax(1) == ref.argmax(1)).mean())
    tolerance = MEDIAPIPE_TOLERANCE[quantize]
    if max(diff.values()) > tolerance:
        raise ExportError(f"MediaPipe's ImageClassifier reads the TFLite file differently from "
                          f"the TFLite interpreter (max difference {max(diff.values()):.2e}, "
                          f"top-1 agreement {same:.4f}); nothing was written")
    files_diff = np.abs(from_files["probabilities"] - ref).max(axis=1)
    return {"metadata": True, "how": HOW, "images_checked": len(x), "tolerance": tolerance,
            "max_abs_diff": diff["probabilities"], "ood_max_abs_diff": diff.get(OOD_SCORE),
            "top1_agreement": same,
            "from_files": {
                "top1_agreement": float((from_files["probabilities"].argmax(1)
                                         == ref.argmax(1)).mean()),
                "max_abs_diff": float(files_diff.max()),
                "mean_abs_diff": float(files_diff.mean()),
                "how": "MediaPipe decoding and resizing the image files itself (its own "
                       "bilinear resize, no EXIF rotation), against graftkit's pixels"}}


def classify(path: Path, images: np.ndarray, n_classes: int) -> dict[str, np.ndarray]:
    """MediaPipe's ``ImageClassifier`` on ``images`` (uint8 RGB at the model's size, so its own
    resizing is the identity): the scores of every head by head name."""
    import mediapipe as mp

    with _classifier(path) as classifier:
        return _stack([_scores(classifier.classify(
            mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(img, dtype=np.uint8))),
            n_classes) for img in images])


def classify_files(path: Path, files: list[str], n_classes: int) -> dict[str, np.ndarray]:
    """The same, on the image files as an app gives them: MediaPipe decodes and resizes."""
    import mediapipe as mp

    with _classifier(path) as classifier:
        return _stack([_scores(classifier.classify(mp.Image.create_from_file(str(f))),
                               n_classes) for f in files])


def _classifier(path: Path):
    from mediapipe.tasks.python import vision
    from mediapipe.tasks.python.core import base_options

    options = vision.ImageClassifierOptions(
        base_options=base_options.BaseOptions(model_asset_path=str(path)), max_results=-1)
    return vision.ImageClassifier.create_from_options(options)


def _scores(result, n_classes: int) -> dict[str, np.ndarray]:
    heads = {}
    for head in result.classifications:
        width = n_classes if head.head_name == PROBABILITIES else 1
        scores = np.zeros(width, np.float32)
        for category in head.categories:
            scores[category.index] = category.score
        heads[head.head_name or PROBABILITIES] = scores
    return heads


def _stack(rows: list[dict]) -> dict[str, np.ndarray]:
    out = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    if OOD_SCORE in out:
        out[OOD_SCORE] = out[OOD_SCORE][:, 0]
    return out


def _writers():
    """MediaPipe's metadata writers. Its recent wheels leave out the small compiled module that
    stamps the metadata with the oldest parser able to read it; ``_parser_version`` stands in
    for it (the same rule, over the same schema) only when it is missing."""
    name = "mediapipe.tasks.cc.metadata.python._pywrap_metadata_version"
    try:
        importlib.import_module(name)
    except ImportError:
        stand_in = types.ModuleType(name)
        stand_in.GetMinimumMetadataParserVersion = _parser_version
        parent = None
        for part in ("mediapipe.tasks.cc", "mediapipe.tasks.cc.metadata",
                     "mediapipe.tasks.cc.metadata.python", name):
            module = sys.modules.setdefault(part, stand_in if part == name
                                            else types.ModuleType(part))
            if parent is not None:
                setattr(parent, part.rsplit(".", 1)[1], module)
            parent = module
    from mediapipe.tasks.python.metadata.metadata_writers import metadata_info, metadata_writer

    return metadata_writer, metadata_info


def _parser_version(buffer: bytes) -> str:
    """The oldest metadata parser that understands every field of ``buffer``, as MediaPipe's
    ``metadata_version.cc`` computes it: 1.0.0, raised by each field added since."""
    from mediapipe.tasks.metadata import metadata_schema_py_generated as fb

    found = [(1, 0, 0)]
    kind, unit, content = fb.AssociatedFileType, fb.ProcessUnitOptions, fb.ContentProperties
    unit_versions = {unit.BertTokenizerOptions: (1, 1, 0),
                     unit.SentencePieceTokenizerOptions: (1, 1, 0),
                     unit.RegexTokenizerOptions: (1, 2, 1)}

    def files(items):
        for f in items or []:
            found.append({kind.VOCABULARY: (1, 0, 1),
                          kind.SCANN_INDEX_FILE: (1, 4, 0)}.get(f.type, (1, 0, 0)))
            if f.version is not None:
                found.append((1, 4, 1))

    def units(items):
        found.extend(unit_versions.get(u.optionsType, (1, 0, 0)) for u in items or [])

    metadata = fb.ModelMetadataT.InitFromObj(fb.ModelMetadata.GetRootAs(buffer, 0))
    for graph in metadata.subgraphMetadata or []:
        for tensor in (graph.inputTensorMetadata or []) + (graph.outputTensorMetadata or []):
            files(tensor.associatedFiles)
            units(tensor.processUnits)
            if tensor.content is not None and \
                    tensor.content.contentPropertiesType == content.AudioProperties:
                found.append((1, 3, 0))
        files(graph.associatedFiles)
        for field, version in (("inputProcessUnits", (1, 1, 0)), ("outputProcessUnits", (1, 1, 0)),
                               ("inputTensorGroups", (1, 2, 0)), ("outputTensorGroups", (1, 2, 0)),
                               ("customMetadata", (1, 5, 0))):
            if getattr(graph, field) is not None:
                found.append(version)
        units(graph.inputProcessUnits)
        units(graph.outputProcessUnits)
    files(metadata.associatedFiles)
    return ".".join(map(str, max(found)))
