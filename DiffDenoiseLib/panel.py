"""The DiffDenoise panel's behaviour: a small state machine over the widgets of DiffDenoise.ui.

No Qt import: the panel only calls widget methods that PythonQt (Slicer) and
PySide6 (tests) share, and reads widget values through `_read`, which accepts
both a PythonQt property and a PySide method. Its collaborators are passed in:

- `ui`: an object with the .ui's widgets as attributes (`slicer.util.childWidgetVariables`);
- `params`: the module's parameter node (the widgets with a `SlicerParameterName`
  are bound to it by Slicer; the panel writes the rest: mode, models, results);
- `logic`: a `DenoiseLogic` (jobs, models, estimates, comparison views);
- `dependencies`: `ready()` says whether torch is there, `ensure()` installs it with
  the user's consent (asked once);
- `show_error(message)`: how a failure reaches the user (a dialog in Slicer).

One job runs at a time (denoise, preview of one slice, or training). States:
idle -> running -> (cancelling ->) idle; the button that started the job is its
Cancel button while it runs.
"""

from typing import Callable, List

from DiffDenoiseLib.worker_protocol import format_seconds

IDLE = "idle"
RUNNING = "running"
CANCELLING = "cancelling"

_TRANSITIONS = {
    (IDLE, "start"): RUNNING,
    (RUNNING, "cancel"): CANCELLING,
    (RUNNING, "finish"): IDLE,
    (CANCELLING, "finish"): IDLE,
}

DENOISE_TEXT = "Denoise"
PREVIEW_TEXT = "Preview slice"
TRAIN_TEXT = "Start training"
CANCEL_TEXT = "Cancel"
STOP_TEXT = "Stop training"
CANCELLING_TEXT = "Cancelling..."
AUTOMATIC_MODEL = "Automatic (shipped model for the modality and noise)"
NEW_MODEL = "None (train a new model)"
STAGES = ("bsn", "diffusion", "student")

# Every widget the panel (and so the module) uses; the .ui must define each of them.
WIDGET_NAMES = (
    "inputSelector", "outputSelector", "fastRadioButton", "fullRadioButton", "modelComboBox", "modelInfoLabel",
    "estimateLabel", "previewButton", "denoiseButton", "progressBar", "logTextEdit",
    "advancedCollapsibleButton", "deviceComboBox", "stepsSpinBox", "pairsSpinBox", "uncertaintyCheckBox",
    "sliceAxisComboBox", "ricianBiasComboBox", "noiseComboBox", "contextSlicesSpinBox", "blindSpotRadiusSpinBox",
    "trainingCollapsibleButton", "trainVolumesSelector", "bsnCheckBox", "diffusionCheckBox", "studentCheckBox",
    "trainStepsSpinBox", "fromModelComboBox", "modelNameLineEdit", "trainButton", "trainProgressBar", "lossLabel",
    "compareCollapsibleButton", "fadeSlider", "overlayButton", "sideBySideButton", "uncertaintyButton",
)


def _read(widget, name):
    """A widget value: PythonQt exposes Qt properties as attributes, PySide6 as methods."""
    value = getattr(widget, name)
    return value() if callable(value) else value


class Panel:
    def __init__(self, ui, params, logic, dependencies, show_error: Callable[[str], None]):
        self.ui = ui
        self.params = params
        self.logic = logic
        self.dependencies = dependencies
        self.show_error = show_error
        self.state = IDLE
        self.job = None
        self.models: List[dict] = []
        self._model_names: List[str] = [""]
        self._from_names: List[str] = [""]
        self._updating = False

    # ---- set-up -------------------------------------------------------------------

    def setup(self) -> None:
        ui = self.ui
        ui.denoiseButton.clicked.connect(self.on_denoise_clicked)
        ui.previewButton.clicked.connect(self.on_preview_clicked)
        ui.trainButton.clicked.connect(self.on_train_clicked)
        ui.fastRadioButton.toggled.connect(self._on_mode_toggled)
        ui.fullRadioButton.toggled.connect(self._on_mode_toggled)
        ui.modelComboBox.currentIndexChanged.connect(self._on_model_chosen)
        ui.fromModelComboBox.currentIndexChanged.connect(self._on_from_model_chosen)
        ui.inputSelector.currentNodeChanged.connect(self._on_input_changed)
        ui.fadeSlider.valueChanged.connect(self._on_fade_changed)
        ui.overlayButton.clicked.connect(self.on_overlay_clicked)
        ui.sideBySideButton.clicked.connect(self.on_side_by_side_clicked)
        ui.uncertaintyButton.clicked.connect(self.on_uncertainty_clicked)
        ui.progressBar.setRange(0, 100)
        ui.trainProgressBar.setRange(0, 100)
        self._set_models([])
        if self.dependencies.ready():
            self.refresh_models()
        self.update_from_parameters()
        self.refresh()

    def refresh_models(self) -> None:
        """Ask the worker for the model list (shipped and user models) and fill both selectors."""
        try:
            models = self.logic.list_models()
        except Exception as error:
            self.log("Could not list the models: %s" % error)
            return
        self._set_models(models)

    def _set_models(self, models: List[dict]) -> None:
        self.models = [m for m in models if m.get("name") and "error" not in m]
        names = [m["name"] for m in self.models]
        self._updating = True
        try:
            self._model_names = [""] + names
            self._from_names = [""] + names
            for combo, first, items in ((self.ui.modelComboBox, AUTOMATIC_MODEL, self._model_names),
                                        (self.ui.fromModelComboBox, NEW_MODEL, self._from_names)):
                combo.clear()
                combo.addItem(first)
                for name in items[1:]:
                    combo.addItem(self._model_title(name))
        finally:
            self._updating = False
        self.update_from_parameters()

    def _model_title(self, name: str) -> str:
        return name + (" (shipped)" if self._card(name).get("source") == "shipped" else "")

    def _card(self, name: str) -> dict:
        return next((m for m in self.models if m.get("name") == name), {})

    def update_from_parameters(self) -> None:
        """Show what the parameter node holds in the widgets Slicer does not bind (after a scene load)."""
        params = self.params
        self._updating = True
        try:
            self.ui.fastRadioButton.setChecked(params.mode != "full")
            self.ui.fullRadioButton.setChecked(params.mode == "full")
            for combo, names, value in ((self.ui.modelComboBox, self._model_names, params.model),
                                        (self.ui.fromModelComboBox, self._from_names, params.trainFromModel)):
                combo.setCurrentIndex(names.index(value) if value in names else 0)
        finally:
            self._updating = False
        self._show_model_card()
        self.update_estimate()

    # ---- parameters ----------------------------------------------------------------

    def _on_mode_toggled(self, *_):
        if not self._updating:
            self.params.mode = "full" if _read(self.ui.fullRadioButton, "isChecked") else "fast"
            self.update_estimate()
            self.refresh()

    def _on_model_chosen(self, index):
        if not self._updating and 0 <= index < len(self._model_names):
            self.params.model = self._model_names[index]
            self._show_model_card()
            self.update_estimate()

    def _on_from_model_chosen(self, index):
        if not self._updating and 0 <= index < len(self._from_names):
            self.params.trainFromModel = self._from_names[index]
            self.refresh()

    def _on_input_changed(self, *_):
        self.update_estimate()
        self.refresh()

    def _show_model_card(self) -> None:
        self.ui.modelInfoLabel.setText(describe_card(self._card(self.params.model)) if self.params.model else
                                       "The shipped model that matches the volume's modality (CT or MR), "
                                       "or the one for spatially correlated noise when the noise looks so.")

    def denoise_settings(self):
        from DiffDenoiseLib.slicer_logic import DenoiseSettings

        p = self.params
        return DenoiseSettings(mode=p.mode, model=p.model, device=p.device, steps=p.steps, pairs=p.pairs,
                               uncertainty=p.uncertainty, slice_axis=p.sliceAxis, rician_bias=p.ricianBias)

    def train_settings(self):
        from DiffDenoiseLib.slicer_logic import TrainSettings

        p = self.params
        stages = tuple(s for s, on in zip(STAGES, (p.trainBsn, p.trainDiffusion, p.trainStudent)) if on)
        return TrainSettings(name=p.trainName.strip(), stages=stages, from_model=p.trainFromModel,
                             max_steps=p.trainMaxSteps, device=p.device, noise=p.trainNoise,
                             context_slices=p.trainContextSlices, blind_spot_radius=p.trainBlindSpotRadius)

    def update_estimate(self) -> None:
        node = self.params.inputVolume
        if node is None:
            self.ui.estimateLabel.setText("Select a volume to denoise.")
            return
        if not self.dependencies.ready():
            self.ui.estimateLabel.setText("PyTorch will be installed (with your consent) on the first run.")
            return
        try:
            estimate = self.logic.estimate(node, self.denoise_settings(), self.models)
        except (ValueError, RuntimeError) as error:
            self.ui.estimateLabel.setText(str(error))
            return
        text = "%s Roughly %s." % (estimate.device_message.split(";")[0].rstrip(".") + ".",
                                   rough_duration(estimate.seconds))
        if estimate.advice:
            text += " " + estimate.advice
        self.ui.estimateLabel.setText(text)

    # ---- jobs ----------------------------------------------------------------------

    def _transition(self, action: str) -> None:
        key = (self.state, action)
        if key not in _TRANSITIONS:
            raise RuntimeError("cannot %s while %s" % (action, self.state))
        self.state = _TRANSITIONS[key]
        self.refresh()

    def on_denoise_clicked(self, *_):
        self._start_or_cancel("denoise")

    def on_preview_clicked(self, *_):
        self._start_or_cancel("preview")

    def on_train_clicked(self, *_):
        self._start_or_cancel("train")

    def _start_or_cancel(self, kind: str) -> None:
        """A job's button starts it when the panel is idle and, having become Cancel, cancels it while it runs."""
        if self.state == IDLE:
            self._start(kind)
        elif self.job is not None and self.job.kind == kind:
            self.cancel()

    def _start(self, kind: str) -> None:
        if not self.dependencies.ensure():
            self.show_error("DiffDenoise needs PyTorch: install it (PyTorch extension) and try again.")
            return
        if not self.models:
            self.refresh_models()
        try:
            if kind == "denoise":
                job = self.logic.denoise_job(self.params.inputVolume, self.denoise_settings(),
                                             self.params.outputVolume)
            elif kind == "preview":
                job = self.logic.preview_job(self.params.inputVolume, self.denoise_settings())
            else:
                nodes = list(self.ui.trainVolumesSelector.checkedNodes())
                job = self.logic.training_job(nodes, self.train_settings())
        except (ValueError, RuntimeError) as error:
            self.show_error(str(error))
            return
        self.job = job
        job.progress.connect(self._on_progress)
        job.log.connect(self.log)
        job.finished.connect(self._on_finished)
        self.ui.logTextEdit.clear()
        self._progress_bar().setValue(0)
        self._progress_bar().setFormat("Starting...")
        if kind == "train":
            self.ui.lossLabel.setText("Loss: -")
        self._transition("start")
        job.start()

    def cancel(self) -> None:
        if self.state == RUNNING:
            self._transition("cancel")
            self.job.cancel()

    def _progress_bar(self):
        kind = self.job.kind if self.job is not None else "denoise"
        return self.ui.trainProgressBar if kind == "train" else self.ui.progressBar

    def _on_progress(self, event: dict) -> None:
        step, total = event.get("step") or 0, event.get("total") or 0
        bar = self._progress_bar()
        bar.setValue(int(round(100.0 * step / total)) if total else 0)
        parts = ["%s %d/%d" % (event.get("stage", ""), step, total)]
        if event.get("eta_s") is not None:
            parts.append("%s left" % format_seconds(event["eta_s"]))
        if self.state == CANCELLING:
            parts = [CANCELLING_TEXT]
        bar.setFormat("  ·  ".join(["%p%"] + parts))
        loss = event.get("loss")
        if self.job.kind == "train" and loss is not None:
            self.ui.lossLabel.setText("Loss (%s): %.4g" % (event.get("stage", ""), loss))

    def _on_finished(self, outcome) -> None:
        bar = self._progress_bar()
        if outcome.status == "done":
            bar.setValue(100)
            bar.setFormat("Done")
        else:
            bar.setValue(0)
            bar.setFormat("Cancelled" if outcome.status == "cancelled" else "Failed")
        self._transition("finish")
        if outcome.status == "done" and outcome.kind in ("denoise", "preview"):
            self.params.denoisedVolume = outcome.output_volume
            self.params.uncertaintyVolume = outcome.uncertainty_volume
            self.params.fade = 1.0
        elif outcome.status == "done" and outcome.kind == "train":
            self.refresh_models()
            self.params.model = outcome.model
            self.update_from_parameters()
        self.refresh()
        if outcome.status == "failed":
            self.show_error(outcome.message)

    def log(self, message: str) -> None:
        self.ui.logTextEdit.appendPlainText(message)

    # ---- comparison ----------------------------------------------------------------

    def _on_fade_changed(self, value):
        if self.params.denoisedVolume is not None:
            self.logic.set_fade(float(value))

    def on_overlay_clicked(self, *_):
        denoised = self.params.denoisedVolume
        self.logic.show_comparison(self.logic.source_volume(denoised), denoised, float(self.params.fade))

    def on_side_by_side_clicked(self, *_):
        denoised = self.params.denoisedVolume
        self.logic.show_side_by_side(self.logic.source_volume(denoised), denoised)

    def on_uncertainty_clicked(self, *_):
        self.logic.show_uncertainty(self.params.denoisedVolume, self.params.uncertaintyVolume)

    # ---- what the widgets show --------------------------------------------------------

    def refresh(self) -> None:
        """Enable, disable and label the widgets for the current state and parameters."""
        ui, params = self.ui, self.params
        idle = self.state == IDLE
        kind = self.job.kind if (self.job is not None and not idle) else None
        has_input = params.inputVolume is not None
        for button, own, text, tip in (
                (ui.denoiseButton, "denoise", DENOISE_TEXT, "Denoise the input volume in the background"),
                (ui.previewButton, "preview", PREVIEW_TEXT, "Denoise only the slice in the Red view, to judge the "
                                                            "settings in seconds before the whole volume")):
            button.setText(text if kind != own else (CANCEL_TEXT if self.state == RUNNING else CANCELLING_TEXT))
            button.setEnabled((idle and has_input) or (kind == own and self.state == RUNNING))
            button.setToolTip("Stop the running denoising" if kind == own else
                              tip if has_input else "Select an input volume first")
        ui.trainButton.setText(TRAIN_TEXT if kind != "train" else
                               (STOP_TEXT if self.state == RUNNING else CANCELLING_TEXT))
        ui.trainButton.setEnabled(idle or (kind == "train" and self.state == RUNNING))
        for widget in (ui.inputSelector, ui.outputSelector, ui.fastRadioButton, ui.fullRadioButton,
                       ui.modelComboBox, ui.deviceComboBox, ui.stepsSpinBox, ui.pairsSpinBox, ui.uncertaintyCheckBox,
                       ui.trainVolumesSelector, ui.bsnCheckBox, ui.diffusionCheckBox, ui.studentCheckBox,
                       ui.trainStepsSpinBox, ui.fromModelComboBox, ui.modelNameLineEdit, ui.sliceAxisComboBox,
                       ui.ricianBiasComboBox):
            widget.setEnabled(idle)
        # an adapted model keeps its architecture and noise transform
        for widget in (ui.noiseComboBox, ui.contextSlicesSpinBox, ui.blindSpotRadiusSpinBox):
            widget.setEnabled(idle and not params.trainFromModel)
        full = params.mode == "full"
        for widget in (ui.stepsSpinBox, ui.pairsSpinBox, ui.uncertaintyCheckBox):
            widget.setEnabled(idle and full)
        has_result = params.denoisedVolume is not None
        for widget in (ui.fadeSlider, ui.overlayButton, ui.sideBySideButton):
            widget.setEnabled(has_result)
        ui.uncertaintyButton.setEnabled(has_result and params.uncertaintyVolume is not None)


def rough_duration(seconds: float) -> str:
    """An estimate's duration without false precision: `15 s`, `4 min`, `2.5 h`."""
    if seconds < 60:
        return "%d s" % max(5, 5 * round(seconds / 5))
    if seconds < 3600:
        return "%d min" % round(seconds / 60)
    return "%.1f h" % (seconds / 3600)


def describe_card(card: dict) -> str:
    """One or two lines about a model for the panel, from its card: its description as written (a sentence of its
    own, which the shipped cards end with a full stop), then its stages, training images and date."""
    description = str(card.get("description") or "").strip()
    if description and not description.endswith((".", "!", "?")):
        description += "."
    facts = []
    if card.get("stages"):
        facts.append("stages: " + ", ".join(card["stages"]))
    count = (card.get("training_data") or {}).get("count")
    if count:
        facts.append("trained on %d image%s" % (count, "" if count == 1 else "s"))
    if card.get("created"):
        facts.append("created " + str(card["created"])[:10])
    listed = "; ".join(facts)
    return " ".join(part for part in (description, listed[:1].upper() + listed[1:] + "." if listed else "") if part)
