"""The module panel: the real DiffDenoise.ui under Qt (PySide6, offscreen) and the panel's state machine.

Slicer's CTK/MRML widget classes are replaced by minimal stand-ins with the
properties and signals the .ui and the panel use. The parameter node is a plain
namespace built from the fields DiffDenoise.py declares, so the panel is tested
against the real parameter list.
"""

import ast
import os
import sys
import time
import types
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
QtCore = pytest.importorskip("PySide6.QtCore")
from PySide6 import QtGui, QtUiTools, QtWidgets  # noqa: E402

from DiffDenoiseLib import panel as panel_module  # noqa: E402
from DiffDenoiseLib.panel import CANCELLING, IDLE, RUNNING, Panel  # noqa: E402
from DiffDenoiseLib.signals import Signal  # noqa: E402
from DiffDenoiseLib.slicer_logic import Estimate, JobOutcome  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
UI_FILE = ROOT / "DiffDenoise" / "Resources" / "UI" / "DiffDenoise.ui"
MODULE_FILE = ROOT / "DiffDenoise" / "DiffDenoise.py"
SCREENSHOT = os.environ.get("DIFFDENOISE_SCREENSHOT", "")


# ---- stand-ins for the CTK and MRML widgets ------------------------------------------------

class ctkCollapsibleButton(QtWidgets.QGroupBox):
    def __init__(self, parent=None):
        super().__init__(parent)
        self._collapsed = False

    def _set_text(self, text):
        self.setTitle(text)

    def _set_collapsed(self, collapsed):
        self._collapsed = collapsed
        for child in self.findChildren(QtWidgets.QWidget, options=QtCore.Qt.FindDirectChildrenOnly):
            child.setVisible(not collapsed)

    text = QtCore.Property(str, QtWidgets.QGroupBox.title, _set_text)
    collapsed = QtCore.Property(bool, lambda self: self._collapsed, _set_collapsed)


class ctkSliderWidget(QtWidgets.QDoubleSpinBox):
    """Value, range, steps and valueChanged(double), as the real slider-with-spin-box has them."""

    pageStep = QtCore.Property(float, lambda s: 10 * s.singleStep(), lambda s, v: None)


class qMRMLNodeComboBox(QtWidgets.QComboBox):
    currentNodeChanged = QtCore.Signal(object)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._nodes = []
        self._none = ""
        self.currentIndexChanged.connect(lambda _: self.currentNodeChanged.emit(self.currentNode()))

    def _set_none_display(self, text):
        self._none = text
        if not self._nodes and self.count() == 0:
            self.addItem(text)

    def addNode(self, node):
        if self._none and not self._nodes:
            self.clear()
            self.addItem(self._none)
        self._nodes.append(node)
        self.addItem(node.GetName())

    def currentNode(self):
        index = self.currentIndex() - (1 if self._none else 0)
        return self._nodes[index] if 0 <= index < len(self._nodes) else None

    def setCurrentNode(self, node):
        self.setCurrentIndex(self._nodes.index(node) + (1 if self._none else 0) if node in self._nodes else -1)

    nodeTypes = QtCore.Property("QStringList", lambda s: [], lambda s, v: None)
    showChildNodeTypes = QtCore.Property(bool, lambda s: False, lambda s, v: None)
    addEnabled = QtCore.Property(bool, lambda s: False, lambda s, v: None)
    removeEnabled = QtCore.Property(bool, lambda s: False, lambda s, v: None)
    renameEnabled = QtCore.Property(bool, lambda s: False, lambda s, v: None)
    noneEnabled = QtCore.Property(bool, lambda s: bool(s._none), lambda s, v: None)
    noneDisplay = QtCore.Property(str, lambda s: s._none, _set_none_display)


class qMRMLCheckableNodeComboBox(qMRMLNodeComboBox):
    def __init__(self, parent=None):
        super().__init__(parent)
        self._checked = []

    def setCheckedNodes(self, nodes):
        self._checked = list(nodes)
        self.setEditText(", ".join(n.GetName() for n in nodes))
        self.setCurrentText(", ".join(n.GetName() for n in nodes))

    def checkedNodes(self):
        return list(self._checked)


STAND_INS = (ctkCollapsibleButton, ctkSliderWidget, qMRMLNodeComboBox, qMRMLCheckableNodeComboBox)


class FakeNode:
    def __init__(self, name):
        self.name = name

    def GetName(self):
        return self.name


# ---- collaborators --------------------------------------------------------------------------

class FakeJob:
    def __init__(self, kind):
        self.kind = kind
        self.progress, self.log, self.finished = Signal("event"), Signal("message"), Signal("outcome")
        self.started = False
        self.cancelled = False

    def start(self, wait_for_completion=False):
        self.started = True
        return self

    def cancel(self):
        self.cancelled = True


class FakeLogic:
    MODELS = [{"name": "mr-brain-2.5d", "source": "shipped", "stages": ["bsn", "diffusion", "student"],
               "description": "Brain MRI (T1) and other non-CT images, for volumes (4 neighbouring slices seen); "
                              "trained on Colin27 with Rician, Poisson and Gamma noise.",
               "training_data": {"count": 5}},
              {"name": "ct-head-2.5d", "source": "shipped", "stages": ["bsn", "diffusion", "student"]},
              {"name": "broken", "source": "user", "error": "card.json is not valid JSON"}]

    def __init__(self):
        self.models = list(self.MODELS)
        self.jobs = []
        self.calls = []
        self.estimated = []  # (model chosen, names of the cards passed) of every estimate asked for

    def list_models(self):
        return list(self.models)

    def estimate(self, node, settings, models):
        self.estimated.append((settings.model, [card["name"] for card in models]))
        seconds = 1500.0 if settings.mode == "full" else 12.0
        advice = "Full mode on the CPU is slow; Fast mode takes about 12 s." if settings.mode == "full" else ""
        return Estimate("cpu", "Using the CPU: no CUDA or MPS device was found; ...", seconds, advice)

    def denoise_job(self, node, settings, output):
        if node is None:
            raise ValueError("Select an input volume with image data.")
        self.calls.append(("denoise", node, settings, output))
        self.jobs.append(FakeJob("denoise"))
        return self.jobs[-1]

    def preview_job(self, node, settings):
        self.calls.append(("preview", node, settings))
        self.jobs.append(FakeJob("preview"))
        return self.jobs[-1]

    def training_job(self, nodes, settings):
        if not settings.name:
            raise ValueError("Give the new model a name.")
        self.calls.append(("train", nodes, settings))
        self.jobs.append(FakeJob("train"))
        return self.jobs[-1]

    def set_fade(self, fade):
        self.calls.append(("fade", fade))

    def source_volume(self, node):
        return self.calls[0][1]

    def show_comparison(self, original, denoised, fade):
        self.calls.append(("overlay", original, denoised, fade))

    def show_side_by_side(self, original, denoised):
        self.calls.append(("side", original, denoised))

    def show_uncertainty(self, denoised, uncertainty):
        self.calls.append(("uncertainty", denoised, uncertainty))


class Dependencies:
    def __init__(self, ready=True):
        self._ready = ready

    def ready(self):
        return self._ready

    def ensure(self):
        return self._ready


def parameter_fields():
    """Field names and literal defaults of the parameter node declared in DiffDenoise.py."""
    tree = ast.parse(MODULE_FILE.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "DiffDenoiseParameterNode")
    assert any(getattr(d, "id", None) == "parameterNodeWrapper" for d in cls.decorator_list)
    fields = {}
    for statement in cls.body:
        if isinstance(statement, ast.AnnAssign):
            fields[statement.target.id] = ast.literal_eval(statement.value) if statement.value else None
    return fields


# ---- fixtures -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def app():
    application = QtWidgets.QApplication.instance() or QtWidgets.QApplication(sys.argv[:1])
    QtGui.QFont.insertSubstitution("Sans Serif", "DejaVu Sans")
    return application


def load_ui(app):
    loader = QtUiTools.QUiLoader()
    for cls in STAND_INS:
        loader.registerCustomWidget(cls)
    ui_file = QtCore.QFile(str(UI_FILE))
    assert ui_file.open(QtCore.QFile.ReadOnly)
    widget = loader.load(ui_file)
    ui_file.close()
    assert widget is not None, loader.errorString()
    ui = types.SimpleNamespace(**{child.objectName(): child for child in widget.findChildren(QtCore.QObject)
                                  if child.objectName()})
    return widget, ui


@pytest.fixture
def panel(app):
    widget, ui = load_ui(app)
    head, knee = FakeNode("MRHead"), FakeNode("Knee")
    for selector in (ui.inputSelector, ui.outputSelector, ui.trainVolumesSelector):
        selector.addNode(head)
        selector.addNode(knee)
    ui.deviceComboBox.addItems(["auto", "cpu", "cuda", "mps"])  # what Slicer's Choice connector does
    ui.sliceAxisComboBox.addItems(["auto", "z", "y", "x"])
    ui.ricianBiasComboBox.addItems(["auto", "remove", "keep"])
    ui.noiseComboBox.addItems(["gaussian", "poisson", "gamma", "rician"])
    params = types.SimpleNamespace(**parameter_fields())
    params.inputVolume = head
    errors = []
    logic = FakeLogic()
    controller = Panel(ui, params, logic, Dependencies(), errors.append)
    controller.setup()
    return types.SimpleNamespace(widget=widget, ui=ui, params=params, logic=logic, panel=controller,
                                 errors=errors, head=head, knee=knee)


# ---- tests -----------------------------------------------------------------------------------------

def test_every_widget_the_module_uses_is_in_the_ui(app):
    _, ui = load_ui(app)
    missing = [name for name in panel_module.WIDGET_NAMES if not hasattr(ui, name)]
    assert missing == []
    used_in_module = set()
    for source in (MODULE_FILE.read_text(), Path(panel_module.__file__).read_text()):
        tree = ast.parse(source)
        used_in_module |= {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
                           and isinstance(node.value, ast.Attribute) and node.value.attr == "ui"}
        used_in_module |= {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
                           and isinstance(node.value, ast.Name) and node.value.id == "ui"}
    assert used_in_module <= set(panel_module.WIDGET_NAMES) and used_in_module
    assert isinstance(ui.inputSelector, qMRMLNodeComboBox)
    assert isinstance(ui.trainVolumesSelector, qMRMLCheckableNodeComboBox)
    assert isinstance(ui.fadeSlider, ctkSliderWidget)


def test_bound_widgets_name_real_parameters(app):
    """Every SlicerParameterName in the .ui is a field of the parameter node (Slicer binds them by name)."""
    widget, _ = load_ui(app)
    fields = parameter_fields()
    bound = {child.property("SlicerParameterName") for child in widget.findChildren(QtWidgets.QWidget)
             if child.property("SlicerParameterName")}
    assert bound and bound <= set(fields)
    assert {"inputVolume", "outputVolume", "device", "steps", "pairs", "fade", "trainName"} <= bound


def test_idle_panel_offers_denoise_and_lists_models(panel):
    ui = panel.ui
    assert panel.panel.state == IDLE
    assert ui.denoiseButton.text() == "Denoise" and ui.denoiseButton.isEnabled()
    assert ui.trainButton.text() == "Start training" and ui.trainButton.isEnabled()
    assert [ui.modelComboBox.itemText(i) for i in range(ui.modelComboBox.count())] == [
        panel_module.AUTOMATIC_MODEL, "mr-brain-2.5d (shipped)", "ct-head-2.5d (shipped)"]
    assert "Roughly 10 s" in ui.estimateLabel.text() and "CPU" in ui.estimateLabel.text()
    assert not ui.fadeSlider.isEnabled() and not ui.sideBySideButton.isEnabled()
    assert not ui.stepsSpinBox.isEnabled()  # Fast mode has no sampling steps

    ui.fullRadioButton.click()
    assert panel.params.mode == "full"
    assert ui.stepsSpinBox.isEnabled() and "Fast mode takes" in ui.estimateLabel.text()
    assert "Roughly 25 min" in ui.estimateLabel.text()
    ui.modelComboBox.setCurrentIndex(1)
    assert panel.params.model == "mr-brain-2.5d"
    assert panel.logic.estimated[-1] == ("mr-brain-2.5d", ["mr-brain-2.5d", "ct-head-2.5d"]), \
        "a new model is a new estimate, from the usable cards"
    assert ui.modelInfoLabel.text() == (FakeLogic.MODELS[0]["description"] + " Stages: bsn, diffusion, student; "
                                        "trained on 5 images.")


def test_a_card_reads_as_sentences_whether_or_not_its_description_ends_with_a_full_stop():
    assert panel_module.describe_card({"description": "Knee MRI", "stages": ["bsn"], "created": "2026-12-06T10:00"}) \
        == "Knee MRI. Stages: bsn; created 2026-12-06."
    assert panel_module.describe_card({"description": "Knee MRI, 3T. "}) == "Knee MRI, 3T."
    assert panel_module.describe_card({"training_data": {"count": 1}}) == "Trained on 1 image."
    assert panel_module.describe_card({}) == ""


def test_denoise_run_cancel_and_done(panel):
    ui, logic = panel.ui, panel.logic
    ui.fullRadioButton.click()
    ui.denoiseButton.click()

    assert panel.panel.state == RUNNING
    job = logic.jobs[-1]
    assert job.started and logic.calls[0][2].mode == "full" and logic.calls[0][2].rician_bias == "auto"
    assert ui.denoiseButton.text() == "Cancel" and ui.denoiseButton.isEnabled()
    assert not ui.trainButton.isEnabled() and not ui.inputSelector.isEnabled()
    assert not ui.ricianBiasComboBox.isEnabled()

    job.progress.emit({"event": "progress", "stage": "denoise", "step": 30, "total": 120, "eta_s": 65.0})
    assert ui.progressBar.value() == 25
    assert "1 min 05 s left" in ui.progressBar.format() and "30/120" in ui.progressBar.format()
    job.log.emit("Using the CPU")
    assert "Using the CPU" in ui.logTextEdit.toPlainText()

    ui.denoiseButton.click()  # the same button cancels
    assert job.cancelled and panel.panel.state == CANCELLING
    assert ui.denoiseButton.text() == "Cancelling..." and not ui.denoiseButton.isEnabled()

    job.finished.emit(JobOutcome("denoise", "cancelled", "Cancelled.", 3))
    assert panel.panel.state == IDLE
    assert ui.denoiseButton.text() == "Denoise" and ui.denoiseButton.isEnabled()
    assert ui.progressBar.format() == "Cancelled" and ui.progressBar.value() == 0
    assert ui.trainButton.isEnabled() and panel.errors == []
    assert panel.params.denoisedVolume is None and not ui.fadeSlider.isEnabled()

    ui.denoiseButton.click()
    job = logic.jobs[-1]
    job.progress.emit({"event": "progress", "stage": "denoise", "step": 120, "total": 120, "eta_s": 0.0})
    result, uncertainty = FakeNode("MRHead denoised"), FakeNode("MRHead uncertainty")
    job.finished.emit(JobOutcome("denoise", "done", "Denoised MRHead in 42 s.", 0, {}, result, uncertainty))
    assert ui.progressBar.value() == 100 and ui.progressBar.format() == "Done"
    assert panel.params.denoisedVolume is result and panel.params.uncertaintyVolume is uncertainty
    assert ui.fadeSlider.isEnabled() and ui.sideBySideButton.isEnabled() and ui.uncertaintyButton.isEnabled()

    ui.fadeSlider.setValue(0.25)
    assert ("fade", 0.25) in logic.calls
    ui.sideBySideButton.click()
    assert ("side", panel.head, result) in logic.calls
    ui.uncertaintyButton.click()
    assert ("uncertainty", result, uncertainty) in logic.calls


def test_preview_of_one_slice_runs_cancels_and_feeds_the_comparison(panel):
    ui, logic = panel.ui, panel.logic
    assert ui.previewButton.text() == "Preview slice" and ui.previewButton.isEnabled()
    ui.fullRadioButton.click()
    ui.previewButton.click()
    job = logic.jobs[-1]
    assert job.kind == "preview" and job.started and logic.calls[-1][:2] == ("preview", panel.head)
    assert logic.calls[-1][2].mode == "full"
    assert ui.previewButton.text() == "Cancel" and ui.previewButton.isEnabled()
    assert not ui.denoiseButton.isEnabled() and ui.denoiseButton.text() == "Denoise" and not ui.trainButton.isEnabled()
    ui.previewButton.click()
    assert job.cancelled and ui.previewButton.text() == "Cancelling..."
    job.finished.emit(JobOutcome("preview", "cancelled", "Cancelled.", 3))
    assert panel.panel.state == IDLE and ui.previewButton.text() == "Preview slice" and ui.denoiseButton.isEnabled()

    ui.previewButton.click()
    preview = FakeNode("MRHead preview")
    logic.jobs[-1].finished.emit(JobOutcome("preview", "done", "Denoised slice 40 (z axis) of MRHead.", 0, {}, preview))
    assert panel.params.denoisedVolume is preview and ui.fadeSlider.isEnabled()
    assert ui.progressBar.format() == "Done" and not ui.uncertaintyButton.isEnabled()


def test_failure_is_reported_and_the_panel_is_usable_again(panel):
    ui = panel.ui
    ui.denoiseButton.click()
    panel.logic.jobs[-1].finished.emit(JobOutcome("denoise", "failed", "The worker refused its input: NaN voxels.", 2))
    assert panel.errors == ["The worker refused its input: NaN voxels."]
    assert ui.progressBar.format() == "Failed" and ui.denoiseButton.text() == "Denoise"
    assert panel.panel.state == IDLE


def test_no_input_means_no_denoise(panel):
    panel.params.inputVolume = None
    panel.panel.refresh()
    assert not panel.ui.denoiseButton.isEnabled()
    panel.panel.update_estimate()
    assert panel.ui.estimateLabel.text() == "Select a volume to denoise."


def test_training_start_stop_and_new_model_in_the_selector(panel):
    ui, logic, params = panel.ui, panel.logic, panel.params
    ui.trainVolumesSelector.setCheckedNodes([panel.head, panel.knee])
    ui.trainButton.click()
    assert panel.errors == ["Give the new model a name."] and panel.panel.state == IDLE

    params.trainName = "knee-3T"
    params.trainDiffusion = False
    params.trainMaxSteps = 500
    params.trainNoise, params.trainContextSlices, params.trainBlindSpotRadius = "poisson", 1, 2
    assert panel.panel.train_settings().noise == "poisson"
    assert panel.panel.train_settings().context_slices == 1 and panel.panel.train_settings().blind_spot_radius == 2
    assert ui.noiseComboBox.isEnabled() and ui.contextSlicesSpinBox.isEnabled()
    ui.fromModelComboBox.setCurrentIndex(1)
    # an adapted model keeps its architecture: those settings are greyed out
    assert not ui.noiseComboBox.isEnabled() and not ui.contextSlicesSpinBox.isEnabled()
    assert not ui.blindSpotRadiusSpinBox.isEnabled()
    ui.trainButton.click()
    _, nodes, settings = logic.calls[-1]
    assert nodes == [panel.head, panel.knee]
    assert settings.stages == ("bsn", "student") and settings.max_steps == 500
    assert settings.from_model == "mr-brain-2.5d" and settings.name == "knee-3T"
    assert ui.trainButton.text() == "Stop training" and not ui.denoiseButton.isEnabled()

    job = logic.jobs[-1]
    job.progress.emit({"event": "progress", "stage": "bsn", "step": 100, "total": 500, "loss": 0.01234, "eta_s": 30})
    assert ui.trainProgressBar.value() == 20 and ui.lossLabel.text() == "Loss (bsn): 0.01234"
    assert ui.progressBar.format() == "Idle"  # the denoise bar is untouched

    logic.models.append({"name": "knee-3T", "source": "user", "stages": ["bsn", "student"]})
    job.finished.emit(JobOutcome("train", "done", "Model knee-3T is trained and ready.", 0, {}, model="knee-3T"))
    assert ui.trainButton.text() == "Start training" and panel.panel.state == IDLE
    assert ui.modelComboBox.itemText(3) == "knee-3T"
    assert ui.modelComboBox.currentIndex() == 3 and params.model == "knee-3T"


def test_scene_load_restores_the_unbound_widgets(panel):
    panel.params.mode = "full"
    panel.params.model = "ct-head-2.5d"
    panel.params.trainFromModel = "mr-brain-2.5d"
    panel.panel.update_from_parameters()
    assert panel.ui.fullRadioButton.isChecked() and not panel.ui.fastRadioButton.isChecked()
    assert panel.ui.modelComboBox.currentIndex() == 2 and panel.ui.fromModelComboBox.currentIndex() == 1


def test_screenshot_of_a_running_panel(panel, tmp_path):
    ui = panel.ui
    ui.advancedCollapsibleButton.setProperty("collapsed", False)
    ui.trainingCollapsibleButton.setProperty("collapsed", False)
    ui.fullRadioButton.click()
    ui.modelComboBox.setCurrentIndex(1)
    ui.uncertaintyCheckBox.setChecked(True)
    ui.trainVolumesSelector.setCheckedNodes([panel.head, panel.knee])
    ui.modelNameLineEdit.setText("my-brain-mri")
    ui.denoiseButton.click()
    job = panel.logic.jobs[-1]
    for message in ("Using the CPU: no CUDA or MPS device was found.",
                    "Using model 'mr-brain-2.5d' (shipped), the default for MR volumes."):
        job.log.emit(message)
    job.progress.emit({"event": "progress", "stage": "denoise", "step": 52, "total": 120, "eta_s": 65.0})
    panel.widget.setFixedWidth(440)
    panel.widget.show()
    QtWidgets.QApplication.processEvents()
    panel.widget.resize(440, panel.widget.heightForWidth(440))
    QtWidgets.QApplication.processEvents()
    image = panel.widget.grab()
    path = Path(SCREENSHOT) if SCREENSHOT else tmp_path / "panel.png"
    assert image.save(str(path))
    assert path.stat().st_size > 10000


SLOW_CLI = """
import json, os, signal, sys, time
args = sys.argv[sys.argv.index("DiffDenoiseLib") + 1:]
if args[0] == "models":
    print(json.dumps({"event": "result", "models": []}), flush=True)
    sys.exit(0)
open(os.environ["PID_FILE"], "w").write(str(os.getpid()))
signal.signal(signal.SIGTERM, lambda *_: sys.exit(3))
for step in range(1, 10000):
    print(json.dumps({"event": "progress", "stage": "denoise", "step": step, "total": 10000, "eta_s": 99.0}),
          flush=True)
    time.sleep(0.02)
"""


@pytest.mark.skipif(os.name == "nt", reason="checks the worker pid through /proc")
def test_real_logic_runs_in_the_background_and_cancel_stops_the_worker(app, tmp_path):
    """Panel + DenoiseLogic on a real MRML scene + a real worker process, polled by a Qt timer."""
    slicer = pytest.importorskip("slicer")
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip("needs the slicer-core wheel")
    import numpy as np
    import slicer.util

    from DiffDenoiseLib.slicer_logic import DenoiseLogic, worker_environment

    slicer.mrmlScene = scene = slicer.vtkMRMLScene()
    node = slicer.util.addVolumeFromArray(np.zeros((3, 16, 16), np.float32), name="phantom")
    script = tmp_path / "slow_cli.py"
    script.write_text(SLOW_CLI)
    env = worker_environment()
    env["PID_FILE"] = str(tmp_path / "pid")
    jobs_dir = tmp_path / "jobs"
    jobs_dir.mkdir()

    def qt_timer(poll):
        timer = QtCore.QTimer()
        timer.timeout.connect(lambda: poll() or timer.stop())
        timer.start(20)
        return timer

    logic = DenoiseLogic(scene=scene, python=[sys.executable, str(script)], env=env, temp_root=str(jobs_dir),
                         timer_factory=qt_timer)
    widget, ui = load_ui(app)
    ui.inputSelector.addNode(node)
    params = types.SimpleNamespace(**parameter_fields())
    params.inputVolume = node
    errors = []
    controller = Panel(ui, params, logic, Dependencies(), errors.append)
    controller.setup()

    def spin_until(condition, seconds=20.0):
        deadline = time.monotonic() + seconds
        while not condition() and time.monotonic() < deadline:
            app.processEvents()
            time.sleep(0.01)
        assert condition()

    ui.denoiseButton.click()  # returns at once: the worker runs in the background
    assert controller.state == RUNNING and ui.denoiseButton.text() == "Cancel"
    spin_until(lambda: ui.progressBar.format().startswith("%p%  ·  denoise"))
    pid = int((tmp_path / "pid").read_text())
    assert len(os.listdir(jobs_dir)) == 1

    ui.denoiseButton.click()
    spin_until(lambda: controller.state == IDLE)
    assert ui.progressBar.format() == "Cancelled" and ui.denoiseButton.text() == "Denoise"
    assert errors == [] and params.denoisedVolume is None
    assert os.listdir(jobs_dir) == []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        if "\nState:\tZ" in Path("/proc/%d/status" % pid).read_text():
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the worker outlived cancel")
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 1
