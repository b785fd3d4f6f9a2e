"""The one place for facts and default hyper-parameters that several modules share."""

from __future__ import annotations

import os
from pathlib import Path

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
# The decoders Pillow may use: those of the extensions above (Pillow's JPEG decoder also opens
# the MPO files of many phone cameras). A TIFF, PSD or any other format renamed to .jpg is
# refused, never parsed.
IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "WEBP")
VAL_DIR_NAMES = ("val", "validation")
TRAIN_DIR_NAME = "train"
TEST_DIR_NAME = "test"  # held-out images beside train/: scored once, never used for a choice

DEFAULT_BACKBONE = "efficientnet_lite0"
VAL_SPLIT = 0.2
SEED = 1337
BATCH_SIZE = 32
# Phase 1: HEAD_EPOCHS epochs of at least MIN_HEAD_STEPS / HEAD_EPOCHS steps each, so that a small
# training set passes over its cached views several times an epoch (20 epochs of 1,000 images
# take 640 steps). On 20 images per class (4 steps a pass) the head was still learning after
# 20 passes; a step on cached features costs milliseconds, a validation pass more, so the
# epochs stay 20 ("Phase 1 on small sets", benchmarks/RESULTS.md).
HEAD_EPOCHS = 20
MIN_HEAD_STEPS = 600
# Room for a whole-base fine-tuning to pay (the digits gain from 5 -> 10 epochs); early
# stopping ends it sooner where it does not. Figures: benchmarks/RESULTS.md.
FINE_TUNE_EPOCHS = 10
# Epochs of phase 2 without a better validation score before it stops (the best weights are
# kept): long enough for a low rate to show a gain, short enough that a trial that does not pay
# costs 3 epochs.
PATIENCE = 3
HEAD_LR = 1e-3
# The guide's 1e-5 rarely beats the head in a few epochs with BatchNormalization frozen; 1e-4
# does ("The three-dataset protocol", benchmarks/RESULTS.md).
FINE_TUNE_LR = 1e-4
# Several labels per image (sigmoids, binary cross-entropy): at 1e-4 the top blocks were still
# improving after 10 epochs on ucm_multilabel; 3e-4 gained 0.4 points of mAP and 1 of
# example-based F1. 5e-4 for 7 epochs on 3 cached views scores as 3e-4 for 10 on 5 (side by
# side, 3 seeds each: mAP 0.9774 against 0.9781, example-based F1 0.9066 against 0.9067) and
# makes a first run a quarter shorter: the frozen pass runs 5,460 views instead of 8,820 and
# phase 2 stops 3 epochs sooner (docs/multilabel.md, benchmarks/multilabel.py).
FINE_TUNE_LR_MULTI_LABEL = 5e-4
FINE_TUNE_EPOCHS_MULTI_LABEL = 7
VIEWS_MULTI_LABEL = 3
# Phase 2's depth. "auto": the whole base when fine-tuning all of it is cheap (training images
# x (side / 224)^2 at most FULL_FINE_TUNE_MAX_IMAGES: about 12 s an epoch on 2 CPU cores),
# else the top UNFREEZE_TOP blocks on cached activations. Past the threshold "all" costs 10-20x
# the time and pays on paintings, not on photos ("Fine-tuning the whole base on the larger
# sets", benchmarks/RESULTS.md).
UNFREEZE = "auto"
# Deeper cuts cost one of the measured sets accuracy, and no dataset may get worse ("Deeper
# cuts on cached activations", benchmarks/RESULTS.md).
UNFREEZE_TOP = 2
FULL_FINE_TUNE_MAX_IMAGES = 200
FULL_FINE_TUNE_SIZE = 224  # the side FULL_FINE_TUNE_MAX_IMAGES counts images at
# Chosen by benchmarks/defaults.py (3 datasets x 3 seeds, benchmarks/RESULTS.md).
MODE = "auto"  # fine-tune, then keep it only where validation says it beat the head
# Per phase. Cosine (5% warm-up, then to 0) lost a point in phase 1 on hymenoptera and flowers5.
LR_SCHEDULE = "constant"
WEIGHT_DECAY = 0.01  # AdamW, decoupled (Keras: var -= var * wd * lr), kernels only
# "auto": 0.1 in runs that fine-tune the whole base (it helps there), none otherwise (it costs
# the top-block runs): "The three-dataset protocol", benchmarks/RESULTS.md.
LABEL_SMOOTHING = "auto"
LABEL_SMOOTHING_WHOLE_BASE = 0.1
LR_DECAY = 1.0  # discriminative rates: each lower block at this times the rate of the one above
UNFREEZE_SCHEDULE = "none"  # every unfrozen block from the first fine-tuning epoch
# Images much smaller than the backbone's input (scikit-learn's 8x8 digits, 32 px icons) are not
# upscaled past this many times their median short side (a multiple of 32, at least
# MIN_AUTO_IMAGE_SIZE): the pixels carry nothing more and the cost grows with the square.
MAX_UPSCALE = 4
MIN_AUTO_IMAGE_SIZE = 64
# Photos train and predict at this times the backbone's pretraining size (a multiple of 32):
# ImageNet training crops make objects look larger than a whole image at the same size, so a
# classifier fine-tuned on whole images sees better at a higher resolution ("FixRes", Touvron
# et al. 2019); it costs (288/224)^2 = 1.65x per image. Figures: benchmarks/RESULTS.md.
NATIVE_SIZE_SCALE = 1.3
# Phase 1 heads trained from different seeds and averaged into one (an exact logit ensemble).
HEADS = 1
MODES = ("auto", "head", "fine-tune")
SCHEDULES = ("constant", "cosine", "one-cycle")
PRECISION = "float32"  # mixed_bfloat16 measured 0.74-0.83x as fast on a 2-core CPU (README)
PRECISIONS = ("float32", "mixed_bfloat16")
STRATEGIES = ("auto", "default", "mirrored", "multi-worker")  # graftkit.train.distribute
# Label issues (graftkit.train.cross_fit): every labelled image scored by a head trained on
# the other folds. 5 is the confident-learning paper's and cleanlab's default.
LABEL_FOLDS = 5
# Cached views per training image: the image and 4 augmented ones. Fewer cost the larger sets
# accuracy at every size ("Cached views per training image", benchmarks/RESULTS.md).
VIEWS = 5
# Dropout before the new Dense layer. "auto": DROPOUT_WHOLE_BASE (the guide's 0.2) in runs that
# fine-tune the whole base, where label smoothing already regularises the head; DROPOUT_CACHED
# elsewhere, where the head trains on cached features of 5 views of each image: the stronger
# rate helps the paintings and ties the photos there, and weakens the whole-base runs' phase 1
# ("Dropout by kind of run", benchmarks/RESULTS.md).
DROPOUT = "auto"
DROPOUT_CACHED = 0.7
DROPOUT_WHOLE_BASE = 0.2
# Every augmentation and its strength when named without a value, as fractions the Keras layers
# take (rotation and hue: of a full turn; crop: of the area a random crop may lose; grayscale: a
# probability; augmix: AugMix's severity, 0-10). AUGMENT is the default set.
AUGMENTATIONS = {"flip": True, "rotation": 0.1, "zoom": 0.1, "contrast": 0.1, "crop": 0.3,
                 "brightness": 0.2, "saturation": 0.3, "hue": 0.05, "grayscale": 0.2, "augmix": 3}
AUGMENT = {k: AUGMENTATIONS[k] for k in ("flip", "rotation", "zoom", "contrast")}
# The strengths each augmentation may take, both ends included. Past them a view either repeats
# itself (rotation and hue past half a turn either way, a probability past 1) or breaks (a zoom,
# contrast or saturation factor of 1 +- F below 0 mirrors the image or inverts its tones; a crop
# keeps at least 5% of the area); AugMix's severity is its reference's 0.1-10 scale.
AUGMENT_RANGES = {"rotation": (0.0, 0.5), "zoom": (0.0, 0.9), "contrast": (0.0, 1.0),
                  "crop": (0.0, 0.95), "brightness": (0.0, 1.0), "saturation": (0.0, 1.0),
                  "hue": (0.0, 0.5), "grayscale": (0.0, 1.0), "augmix": (0.1, 10.0)}
# Named sets for --augment. "style": for data whose deployment images may differ in style (paint,
# print, lighting) but whose classes do not hinge on colour; not the default: it costs data
# whose classes are told apart by colour ("Dropout by kind of run", benchmarks/RESULTS.md).
AUGMENT_PRESETS = {
    "basic": AUGMENT,
    "style": {**AUGMENT, **{k: AUGMENTATIONS[k]
                            for k in ("brightness", "saturation", "hue", "grayscale")}},
}

# Images with more pixels than this are refused unread (decompression bombs); Pillow's default.
MAX_PIXELS = 89_478_485
# graft check: what counts as tiny, extreme, imbalanced or nearly identical.
TINY_SIDE = 32
MAX_ASPECT = 4.0
IMBALANCE_RATIO = 1.5
NEAR_DUPLICATE_BITS = 16  # of 256 in the difference hash (measured on flowers5)
# ... and the two images' 16x16 grayscale thumbnails correlate at least this much
# (benchmarks/near_copies.py: photos, paintings, cartoons and line drawings)
NEAR_DUPLICATE_CORRELATION = 0.9

CACHE_ENV = "GRAFTKIT_CACHE_DIR"
CACHE_LIMIT_ENV = "GRAFTKIT_CACHE_LIMIT_GB"
CACHE_LIMIT_GB = 4.0  # features and converted engines; least recently used go first
# Room a run folder needs: 4 bytes a parameter for the model file, the last and best checkpoint
# weights and the optimizer's two moments (6 copies), plus plots, report and predictions.
BYTES_PER_PARAM_ON_DISK = 4 * 6
DISK_MARGIN = 50_000_000
# Decoded training images beyond this many bytes go to a memory-mapped file, not RAM.
DECODED_MEMORY_BUDGET = 1 << 30
# Converting the frozen part to TFLite takes ~9.5 s; extracting hymenoptera's views (decoding and
# augmenting included) ran at 95 images/s on it and 64 on compiled Keras, so it pays from ~1,900
# images on: smaller jobs run on Keras (predictions reuse an engine already cached; graft fit
# decides by the job's size alone, so its training inputs never depend on earlier runs).
ENGINE_MIN_IMAGES = 2000
# Frozen outputs of one split beyond this many bytes are kept in a scratch file and read back a
# batch at a time (20,000 images x 5 views of cut activations: 1.9 GB).
FEATURE_MEMORY_BUDGET = 512 << 20


def photo_image_size(native: int) -> int:
    """The side photos train at: NATIVE_SIZE_SCALE x the backbone's, the nearest multiple of 32."""
    return max(32, round(native * NATIVE_SIZE_SCALE / 32) * 32)


def cache_dir() -> Path:
    """Where converted weights live: ``$GRAFTKIT_CACHE_DIR`` or ``~/.cache/graftkit``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "graftkit"

# Calibration and the "unknown" answer (graftkit.outputs.calibration / open_set).
MIN_LABEL_POSITIVES = 10  # multi-label: fewer training images with a label: graft check warns
MIN_THRESHOLD_POSITIVES = 5  # fewer validation images with a label: its threshold stays 0.5
CALIBRATE = "auto"  # temperature scaling, kept only when it lowers the held-out ECE
OPEN_SET_METHOD = "knn"  # measured against msp/energy/mahalanobis: benchmarks/open_set.py
OPEN_SET_K = 5
OPEN_SET_MAX_BANK = 20000  # training images kept for the kNN score (a fixed sample beyond): 51 MB
CLOSEST_MAX_IMAGES = 5000  # training images kept for "closest training images" (a fixed sample beyond)
EXPLAIN_CLOSEST = 3  # closest training images shown beside an explanation
OPEN_SET_KEEP = 0.95  # the threshold keeps this share of the validation images

# graft serve
SERVE_PORT = 8000
SERVE_MAX_UPLOAD_MB = 20.0  # a request body above this is refused with 413
# An image decodes to 3-4 bytes a pixel, plus a copy or two while it is converted: 25 MP (a
# 6000x4000 photo) costs ~200 MB at most, and the server decodes one image per core at a time.
SERVE_MAX_PIXELS = 25_000_000
SERVE_MAX_FILES = 64  # images in one POST /predict; more: 413 (the batcher slices the rest)
