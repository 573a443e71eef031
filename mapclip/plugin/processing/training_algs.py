"""Processing algorithms that prepare training data and train: fine-tune,
Box-to-Caption, Mask-to-Box, de-duplicate.

Each calls the engine function behind the matching ``python -m engine``
subcommand (finetune, convert b2c, convert m2b, dedup) with the same options.
"""
from __future__ import annotations

from typing import Any, Dict, List

from qgis.core import (QgsProcessingOutputFile, QgsProcessingParameterDefinition,
                       QgsProcessingOutputFolder, QgsProcessingOutputNumber,
                       QgsProcessingParameterBoolean, QgsProcessingParameterEnum,
                       QgsProcessingParameterFile, QgsProcessingParameterFileDestination,
                       QgsProcessingParameterFolderDestination, QgsProcessingParameterNumber,
                       QgsProcessingParameterString)

from .common import FeedbackBridge, MapClipAlgorithm, default_model, engine_errors, optional_number

from ...engine.core.options import DedupOptions, MaskOptions
from ...engine.core.options import FREEZE as FREEZE_
from ...engine.core.options import PIR_LABELS as PIR_LABELS_
from ...engine.core.options import RECIPES as RECIPES_
from ...engine.core.options import FinetuneOptions

#: the engine's defaults, read once (engine.core.options, engine.convert and engine.dedup.duplicates need no torch)
FT = FinetuneOptions(model="", data="", out="")
FREEZE = list(FREEZE_)
RECIPES = list(RECIPES_)
PIR_LABELS = list(PIR_LABELS_)
B2C_FORMATS = ["coco", "dota", "yolo", "voc"]


def split_paths(text: str) -> List[str]:
    """Folders given as one string, separated by ';' or new lines."""
    parts: List[str] = []
    for line in (text or "").replace("\r", "\n").split("\n"):
        parts.extend(p.strip() for p in line.split(";"))
    return [p for p in parts if p]


class FinetuneAlgorithm(MapClipAlgorithm):
    ALG_NAME = "finetune"
    DISPLAY = "Fine-tune a model"
    GROUP = "training"
    HELP = ("Continues contrastive (InfoNCE) training of a CLIP model on image-caption pairs, "
            "as RemoteCLIP does.<br><b>Data</b>: CSV/TSV (image path, caption), JSONL, or the "
            "RSICD / UCM / RSITMD caption JSON; relative image paths resolve against the data "
            "file's folder.<br>Checkpoints are written every epoch into the run folder; "
            "<i>run folder</i>/best is a model folder you can give to every MapCLIP algorithm "
            "and to the dock. Resume continues an interrupted run in the same folder.<br>"
            "<b>Recipe</b> pir trains PIR-CLIP (a scene classifier instructs the image tower; "
            "InfoNCE plus the cluster-wise affiliation loss): the data needs a label (or class) "
            "column with each image's scene class; the classifier is trained first on the same "
            "data, or read from the prior checkpoint.<br>"
            "<b>Marked places</b> (a GeoPackage, GeoJSON or Shapefile with a <i>label</i> field, "
            "e.g. the dock's MapCLIP examples layer saved): each mark's chip is cut from the "
            "raster it was made on; 'like this' marks are captioned by their prompt, 'not this' "
            "marks only where a caption field says what they are.<br>"
            "Same engine call as <code>python -m engine finetune</code>.")

    DATA, MODEL, OUTPUT, EPOCHS, BATCH_SIZE, LR = "DATA", "MODEL", "OUTPUT", "EPOCHS", "BATCH_SIZE", "LR"
    VAL_SPLIT, FREEZE_P, UNLOCK_LAST, RESUME, DEVICE = "VAL_SPLIT", "FREEZE", "UNLOCK_LAST", "RESUME", "DEVICE"
    BEST, MEAN_RECALL = "BEST_MODEL", "MEAN_RECALL"
    IMAGES, ACCUM = "IMAGES", "ACCUM"
    RECIPE, PIR_PRIOR, PIR_LABELS_P = "RECIPE", "PIR_PRIOR", "PIR_LABELS"
    RASTER, MARKS_CAPTION = "RASTER", "MARKS_CAPTION"

    def initAlgorithm(self, config=None):  # noqa: N802
        self.addParameter(QgsProcessingParameterFile(self.DATA, "Image-caption file or marked places"))
        self.addParameter(QgsProcessingParameterFile(
            self.RASTER, "Raster of the marked places", optional=True))
        self.addParameter(QgsProcessingParameterString(
            self.MARKS_CAPTION, "Caption of marks without a prompt", optional=True))
        self.addParameter(QgsProcessingParameterFile(
            self.IMAGES, "Image folder for relative paths (empty: the data file's folder)",
            behavior=QgsProcessingParameterFile.Folder, optional=True))
        self.addParameter(QgsProcessingParameterString(self.MODEL, "Base model", defaultValue=default_model()))
        self.addParameter(QgsProcessingParameterEnum(
            self.RECIPE, "Recipe (clip: InfoNCE; pir: PIR-CLIP, needs scene labels)",
            options=RECIPES, defaultValue=RECIPES.index(FT.recipe)))
        self.addParameter(QgsProcessingParameterEnum(
            self.PIR_LABELS_P, "PIR scene labels (column: a label/class column; filename: the "
                               "name's part before the first _)",
            options=PIR_LABELS, defaultValue=PIR_LABELS.index(FT.pir_labels)))
        self.addParameter(QgsProcessingParameterFile(
            self.PIR_PRIOR, "PIR prior checkpoint (empty: trained first on the same data)",
            optional=True))
        self.addParameter(QgsProcessingParameterNumber(
            self.EPOCHS, "Epochs", QgsProcessingParameterNumber.Integer,
            defaultValue=FT.epochs, minValue=1))
        self.addParameter(QgsProcessingParameterNumber(
            self.BATCH_SIZE, "Batch size", QgsProcessingParameterNumber.Integer,
            defaultValue=FT.batch_size, minValue=2))
        accum = QgsProcessingParameterNumber(
            self.ACCUM, "Gradient accumulation: micro-batches per step (contrastive batch = "
                        "batch size x this)", QgsProcessingParameterNumber.Integer,
            defaultValue=FT.accum, minValue=1)
        accum.setFlags(accum.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
        self.addParameter(accum)
        self.addParameter(QgsProcessingParameterNumber(
            self.LR, "Learning rate", QgsProcessingParameterNumber.Double,
            defaultValue=FT.lr, minValue=0.0))
        self.addParameter(QgsProcessingParameterNumber(
            self.VAL_SPLIT, "Validation fraction (when the data has no split)",
            QgsProcessingParameterNumber.Double, defaultValue=FT.val_split,
            minValue=0.0, maxValue=0.9))
        self.addParameter(QgsProcessingParameterEnum(
            self.FREEZE_P, "Freeze", options=FREEZE, defaultValue=FREEZE.index(FT.freeze)))
        self.addParameter(QgsProcessingParameterNumber(
            self.UNLOCK_LAST, "Unlock the last N blocks of the frozen tower",
            QgsProcessingParameterNumber.Integer, defaultValue=FT.unlock_last, minValue=0))
        self.addParameter(QgsProcessingParameterBoolean(self.RESUME, "Resume the run in the output folder",
                                                        defaultValue=False))
        self.addParameter(QgsProcessingParameterString(self.DEVICE, "Device (empty: best available)",
                                                       optional=True))
        self.addParameter(QgsProcessingParameterFolderDestination(self.OUTPUT, "Run folder"))
        self.addOutput(QgsProcessingOutputFolder(self.BEST, "Best model folder"))
        self.addOutput(QgsProcessingOutputNumber(self.MEAN_RECALL, "Validation mean recall after training"))

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        out = self.parameterAsString(parameters, self.OUTPUT, context)
        with engine_errors():
            from ...engine.finetune import finetune
            device = self.parameterAsString(parameters, self.DEVICE, context).strip() or None
            options = FinetuneOptions(
                model=self.parameterAsString(parameters, self.MODEL, context).strip() or default_model(),
                data=self.parameterAsFile(parameters, self.DATA, context),
                out=out,
                epochs=self.parameterAsInt(parameters, self.EPOCHS, context),
                batch_size=self.parameterAsInt(parameters, self.BATCH_SIZE, context),
                accum=self.parameterAsInt(parameters, self.ACCUM, context),
                image_root=self.parameterAsFile(parameters, self.IMAGES, context) or None,
                lr=self.parameterAsDouble(parameters, self.LR, context),
                val_split=self.parameterAsDouble(parameters, self.VAL_SPLIT, context),
                freeze=FREEZE[self.parameterAsEnum(parameters, self.FREEZE_P, context)],
                unlock_last=self.parameterAsInt(parameters, self.UNLOCK_LAST, context),
                resume=self.parameterAsBool(parameters, self.RESUME, context),
                recipe=RECIPES[self.parameterAsEnum(parameters, self.RECIPE, context)],
                pir_prior=self.parameterAsFile(parameters, self.PIR_PRIOR, context) or None,
                pir_labels=PIR_LABELS[self.parameterAsEnum(parameters, self.PIR_LABELS_P, context)],
                raster=self.parameterAsFile(parameters, self.RASTER, context) or None,
                marks_caption=self.parameterAsString(parameters, self.MARKS_CAPTION, context).strip() or None,
                device=device)
            bridge = FeedbackBridge(feedback)

            def on_metrics(metrics: Dict[str, Any]) -> None:
                feedback.pushInfo(", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                            for k, v in metrics.items()))

            result = finetune(options, progress=bridge.progress, cancel=bridge, on_metrics=on_metrics)
        if result.skipped is not None and getattr(result.skipped, "total", 0):
            feedback.pushWarning(result.skipped.summary())
        recall = result.metrics_after.get("mean_recall")
        feedback.pushInfo(f"mean recall before {result.metrics_before.get('mean_recall')}, "
                          f"after {recall}; best epoch {result.best_epoch}")
        return {self.OUTPUT: result.run_dir, self.BEST: result.best_path or "",
                self.MEAN_RECALL: float(recall) if recall is not None else -1.0}


class BoxToCaptionAlgorithm(MapClipAlgorithm):
    ALG_NAME = "boxtocaption"
    DISPLAY = "Box-to-Caption"
    GROUP = "training"
    NEEDS_MODEL = False
    HELP = ("Turns detection annotations into image-caption pairs by RemoteCLIP's rules: five "
            "captions per image; caption 1 names the objects in the centre of the image, caption "
            "2 the others, captions 3-5 count random categories ('3 airplanes and a storage "
            "tank'); more than ten becomes 'many'. Images without objects get no caption. "
            "Deterministic for a seed. The CSV feeds fine-tuning.<br>"
            "Same engine call as <code>python -m engine convert b2c</code>.")

    ANNOTATIONS, FORMAT, IMAGES, SEED, OUTPUT = "ANNOTATIONS", "FORMAT", "IMAGES", "SEED", "OUTPUT"
    IMAGES_OUT, CAPTIONS_OUT = "IMAGE_COUNT", "CAPTION_COUNT"

    def initAlgorithm(self, config=None):  # noqa: N802
        self.addParameter(QgsProcessingParameterFile(
            self.ANNOTATIONS, "Annotations (COCO/VOC file or folder, DOTA/YOLO label folder)",
            behavior=QgsProcessingParameterFile.File))
        self.addParameter(QgsProcessingParameterEnum(self.FORMAT, "Format", options=B2C_FORMATS,
                                                     defaultValue=0))
        self.addParameter(QgsProcessingParameterFile(
            self.IMAGES, "Image folder (needed by YOLO and DOTA for image sizes)",
            behavior=QgsProcessingParameterFile.Folder, optional=True))
        self.addParameter(QgsProcessingParameterNumber(self.SEED, "Random seed",
                                                       QgsProcessingParameterNumber.Integer,
                                                       defaultValue=0))
        self.addParameter(QgsProcessingParameterFileDestination(
            self.OUTPUT, "Captions", fileFilter="CSV files (*.csv)"))
        self.addOutput(QgsProcessingOutputNumber(self.IMAGES_OUT, "Images captioned"))
        self.addOutput(QgsProcessingOutputNumber(self.CAPTIONS_OUT, "Captions written"))

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        out = self.parameterAsFileOutput(parameters, self.OUTPUT, context)
        with engine_errors():
            from ...engine.core.options import BoxCaptionOptions
            from ...engine.data.box_caption import box_to_caption
            options = BoxCaptionOptions(
                format=B2C_FORMATS[self.parameterAsEnum(parameters, self.FORMAT, context)],
                images_dir=self.parameterAsFile(parameters, self.IMAGES, context) or None,
                seed=self.parameterAsInt(parameters, self.SEED, context),
                overwrite=True)  # Processing asks before replacing a destination
            bridge = FeedbackBridge(feedback)
            result = box_to_caption(self.parameterAsFile(parameters, self.ANNOTATIONS, context),
                                    out, options, progress=bridge.progress, cancel=bridge)
        feedback.pushInfo(f"{result.captions} captions for {result.captioned} of {result.images} "
                          f"images ({result.objects} objects, categories: "
                          f"{', '.join(result.categories)})")
        if result.empty:
            feedback.pushWarning(f"{len(result.empty)} images have no objects and got no captions")
        return {self.OUTPUT: result.out, self.IMAGES_OUT: result.captioned,
                self.CAPTIONS_OUT: result.captions}


class MaskToBoxAlgorithm(MapClipAlgorithm):
    ALG_NAME = "masktobox"
    DISPLAY = "Mask-to-Box"
    GROUP = "training"
    NEEDS_MODEL = False
    HELP = ("Turns segmentation masks into boxes: per class, the outer contours of each "
            "connected region (OpenCV findContours) become one axis-aligned box; written as "
            "COCO JSON. Optionally chains into Box-to-Caption.<br>"
            "Same engine call as <code>python -m engine convert m2b</code>.")

    MASKS, CLASSES, MIN_AREA, IGNORE, OUTPUT, CAPTIONS = "MASKS", "CLASSES", "MIN_AREA", "IGNORE_INDEX", "OUTPUT", "CAPTIONS"
    IMAGES = "IMAGES"
    BOXES_OUT = "BOX_COUNT"

    def initAlgorithm(self, config=None):  # noqa: N802
        self.addParameter(QgsProcessingParameterFile(self.MASKS, "Mask folder",
                                                     behavior=QgsProcessingParameterFile.Folder))
        self.addParameter(QgsProcessingParameterFile(self.CLASSES, "Classes (JSON: value -> name)",
                                                     extension="json"))
        self.addParameter(QgsProcessingParameterFile(
            self.IMAGES, "Image folder (images named like the masks; optional)",
            behavior=QgsProcessingParameterFile.Folder, optional=True))
        self.addParameter(QgsProcessingParameterNumber(self.MIN_AREA, "Minimum region area, px",
                                                       QgsProcessingParameterNumber.Integer,
                                                       defaultValue=MaskOptions().min_area, minValue=0))
        self.addParameter(QgsProcessingParameterNumber(self.IGNORE, "Ignore value (empty: none)",
                                                       QgsProcessingParameterNumber.Integer,
                                                       optional=True))
        self.addParameter(QgsProcessingParameterFileDestination(
            self.OUTPUT, "Boxes (COCO JSON)", fileFilter="JSON files (*.json)"))
        self.addParameter(QgsProcessingParameterFileDestination(
            self.CAPTIONS, "Captions (Box-to-Caption, optional)", fileFilter="CSV files (*.csv)",
            optional=True, createByDefault=False))
        self.addOutput(QgsProcessingOutputNumber(self.BOXES_OUT, "Boxes written"))

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        out = self.parameterAsFileOutput(parameters, self.OUTPUT, context)
        captions = None
        if parameters.get(self.CAPTIONS) not in (None, ""):
            captions = self.parameterAsFileOutput(parameters, self.CAPTIONS, context) or None
        ignore = None
        if optional_number(parameters.get(self.IGNORE)) not in (None, ""):
            ignore = self.parameterAsInt(parameters, self.IGNORE, context)
        with engine_errors():
            from ...engine.data.mask_box import mask_to_box
            options = MaskOptions(min_area=self.parameterAsInt(parameters, self.MIN_AREA, context),
                                  ignore_index=ignore,
                                  images_dir=self.parameterAsFile(parameters, self.IMAGES, context) or None,
                                  captions=captions, overwrite=True)
            bridge = FeedbackBridge(feedback)
            result = mask_to_box(self.parameterAsFile(parameters, self.MASKS, context),
                                 self.parameterAsFile(parameters, self.CLASSES, context), out, options,
                                 progress=bridge.progress, cancel=bridge)
        feedback.pushInfo(f"{result.boxes} boxes from {result.masks} masks: "
                          + ", ".join(f"{k} {v}" for k, v in sorted(result.per_class.items())))
        if result.unknown_values:
            feedback.pushWarning("mask values not in the classes file were skipped: "
                                 + ", ".join(str(v) for v in sorted(result.unknown_values)))
        outputs = {self.OUTPUT: result.out, self.BOXES_OUT: result.boxes}
        if result.captions is not None:
            outputs[self.CAPTIONS] = result.captions.out
        return outputs


class DeduplicateAlgorithm(MapClipAlgorithm):
    ALG_NAME = "deduplicate"
    DISPLAY = "De-duplicate images (p-Hash)"
    GROUP = "training"
    NEEDS_MODEL = False
    HELP = ("Finds near-duplicate images by p-Hash, as RemoteCLIP does before training: pairs "
            "within the Hamming distance (default below 2) are found exactly, without comparing "
            "every pair. With a test folder it reports training images that duplicate test "
            "images (test-set contamination). Writes a CSV report; moves duplicates to a "
            "quarantine folder only when one is given (with a manifest that "
            "<code>python -m engine dedup --undo</code> reverses). Inputs are never deleted.<br>"
            "Same engine call as <code>python -m engine dedup</code>.")

    FOLDER, MORE, AGAINST, DISTANCE, HASH_SIZE, SEGMENTS = "FOLDER", "MORE_FOLDERS", "AGAINST", "MAX_DISTANCE", "HASH_SIZE", "SEGMENTS"
    OUTPUT, MOVE_TO = "OUTPUT", "MOVE_TO"
    GROUPS_OUT, DUPLICATES_OUT, MANIFEST_OUT = "GROUPS", "DUPLICATES", "MANIFEST"

    def initAlgorithm(self, config=None):  # noqa: N802
        self.addParameter(QgsProcessingParameterFile(self.FOLDER, "Image folder",
                                                     behavior=QgsProcessingParameterFile.Folder))
        self.addParameter(QgsProcessingParameterString(
            self.MORE, "More image folders (separated by ;)", optional=True))
        self.addParameter(QgsProcessingParameterFile(
            self.AGAINST, "Test folder (report training images that duplicate it)",
            behavior=QgsProcessingParameterFile.Folder, optional=True))
        self.addParameter(QgsProcessingParameterNumber(
            self.DISTANCE, "Maximum Hamming distance", QgsProcessingParameterNumber.Integer,
            defaultValue=DedupOptions().max_distance, minValue=0))
        self.addParameter(QgsProcessingParameterNumber(
            self.HASH_SIZE, "Hash size (bits per side)", QgsProcessingParameterNumber.Integer,
            defaultValue=DedupOptions().hash_size, minValue=4))
        self.addParameter(QgsProcessingParameterNumber(
            self.SEGMENTS, "Hash segments (empty: distance + 1, never misses a pair)",
            QgsProcessingParameterNumber.Integer, optional=True, minValue=1))
        self.addParameter(QgsProcessingParameterFileDestination(
            self.OUTPUT, "Report", fileFilter="CSV files (*.csv)"))
        self.addParameter(QgsProcessingParameterFolderDestination(
            self.MOVE_TO, "Quarantine folder (move duplicates there; optional)", optional=True,
            createByDefault=False))
        self.addOutput(QgsProcessingOutputNumber(self.GROUPS_OUT, "Duplicate groups"))
        self.addOutput(QgsProcessingOutputNumber(self.DUPLICATES_OUT, "Duplicate images"))
        self.addOutput(QgsProcessingOutputFile(self.MANIFEST_OUT, "Move manifest"))

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        folders = [self.parameterAsFile(parameters, self.FOLDER, context)]
        folders += split_paths(self.parameterAsString(parameters, self.MORE, context))
        against = self.parameterAsFile(parameters, self.AGAINST, context) or None
        out = self.parameterAsFileOutput(parameters, self.OUTPUT, context)
        move_to = None
        if parameters.get(self.MOVE_TO) not in (None, ""):
            move_to = self.parameterAsString(parameters, self.MOVE_TO, context) or None
        segments = None
        if optional_number(parameters.get(self.SEGMENTS)) not in (None, ""):
            segments = self.parameterAsInt(parameters, self.SEGMENTS, context)
        with engine_errors():
            from ...engine.dedup.duplicates import find_duplicates
            from ...engine.dedup.quarantine import move_duplicates
            options = DedupOptions(max_distance=self.parameterAsInt(parameters, self.DISTANCE, context),
                                   hash_size=self.parameterAsInt(parameters, self.HASH_SIZE, context),
                                   segments=segments, overwrite=True)
            find = FeedbackBridge(feedback, 0.0, 80.0 if move_to else 100.0)
            result = find_duplicates(folders, out, against=[against] if against else None,
                                     options=options, progress=find.progress, cancel=find)
            feedback.pushInfo(f"{result.images} images, {len(result.groups)} duplicate groups, "
                              f"{len(result.contaminated)} duplicating the test folder; "
                              f"{len(result.remove)} not kept")
            for path, reason in result.unreadable[:20]:
                feedback.pushWarning(f"unreadable, skipped: {path} ({reason})")
            manifest = ""
            if move_to and result.remove:
                move = FeedbackBridge(feedback, 80.0, 20.0)
                moved = move_duplicates(result, move_to, progress=move.progress, cancel=move)
                manifest = moved.manifest
                feedback.pushInfo(f"moved {moved.moved} images to {move_to}; undo with "
                                  f"python -m engine dedup --undo {manifest}")
        return {self.OUTPUT: result.report or out, self.GROUPS_OUT: len(result.groups),
                self.DUPLICATES_OUT: len(result.remove), self.MANIFEST_OUT: manifest,
                self.MOVE_TO: move_to or ""}
