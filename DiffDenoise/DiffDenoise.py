"""DiffDenoise: self-supervised denoising of CT, MRI and X-ray volumes in 3D Slicer.

This file is the Slicer entry point only: module description, parameter node,
widget, logic and self-test. The work is done by DiffDenoiseLib (the panel's state
machine in `panel.py`, scene handling in `slicer_logic.py`, the background worker
in `process.py`), which the tests exercise outside Slicer.
"""

import os
import sys
from typing import Annotated

import vtk

import slicer
from slicer import vtkMRMLScalarVolumeNode
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.util import VTKObservationMixin

# From a source checkout the library sits beside this folder; in an extension build it is
# installed next to this file as a scripted package.
_REPOSITORY_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_REPOSITORY_ROOT, "DiffDenoiseLib")) and _REPOSITORY_ROOT not in sys.path:
    sys.path.insert(0, _REPOSITORY_ROOT)

from DiffDenoiseLib.panel import Panel  # noqa: E402
from DiffDenoiseLib.slicer_logic import DenoiseLogic, DenoiseSettings  # noqa: E402

MINIMUM_TORCH_VERSION = "2.0"
DOCUMENTATION_URL = "https://github.com/diffdenoise/SlicerDiffDenoise#readme"


class DiffDenoise(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "DiffDenoise"
        self.parent.categories = ["Filtering.Denoising"]
        self.parent.dependencies = []
        self.parent.contributors = ["DiffDenoise developers"]
        self.parent.helpText = (
            "Removes noise from CT, MRI and X-ray volumes with networks trained on noisy images only. "
            "<b>Fast</b> runs a distilled student network (one pass, and a second to choose how much of the "
            "input to keep); <b>Full</b> runs conditional diffusion "
            "with stabilized symmetric sampling (best quality, slow without a GPU) and can give a per-voxel "
            "uncertainty map. Both end with a Wiener filter of the input guided by the networks' result (for "
            "single images averaged with a classical block-matching estimate), which gives back the fine "
            "structure that similar patches agree on; a volume with white noise, given a 2.5D model, goes to a "
            "volumetric block-matching filter alone, which gave better images there than the networks; under "
            "spatially correlated noise the filters take each coefficient's noise from the noise's covariance, "
            "read on the image. "
            "Models can be trained or adapted on the volumes loaded in Slicer. "
            'See the <a href="%s">documentation</a>.' % DOCUMENTATION_URL)
        self.parent.acknowledgementText = (
            "Built on the stabilized reverse diffusion sampling and blind-spot denoising literature, "
            "3D Slicer, PyTorch and SimpleITK.")


@parameterNodeWrapper
class DiffDenoiseParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    outputVolume: vtkMRMLScalarVolumeNode
    denoisedVolume: vtkMRMLScalarVolumeNode
    uncertaintyVolume: vtkMRMLScalarVolumeNode
    mode: Annotated[str, Choice(["fast", "full"])] = "fast"
    model: str = ""
    device: Annotated[str, Choice(["auto", "cpu", "cuda", "mps"])] = "auto"
    steps: Annotated[int, WithinRange(0, 200)] = 0
    pairs: Annotated[int, WithinRange(0, 16)] = 0
    uncertainty: bool = False
    sliceAxis: Annotated[str, Choice(["auto", "z", "y", "x"])] = "auto"
    ricianBias: Annotated[str, Choice(["auto", "remove", "keep"])] = "auto"
    trainBsn: bool = True
    trainDiffusion: bool = True
    trainStudent: bool = True
    trainMaxSteps: Annotated[int, WithinRange(0, 1000000)] = 0
    trainFromModel: str = ""
    trainName: str = ""
    trainNoise: Annotated[str, Choice(["gaussian", "poisson", "gamma", "rician"])] = "gaussian"
    trainContextSlices: Annotated[int, WithinRange(0, 3)] = 0
    trainBlindSpotRadius: Annotated[int, WithinRange(0, 3)] = 0
    fade: Annotated[float, WithinRange(0.0, 1.0)] = 1.0


class TorchDependency:
    """torch from the PyTorch extension (PyTorchUtils), installed with the user's consent, asked once."""

    def __init__(self):
        self._asked = False
        self._ready = False

    def ready(self) -> bool:
        if not self._ready:
            try:
                import PyTorchUtils
            except ImportError:
                return False
            self._ready = bool(PyTorchUtils.PyTorchUtilsLogic().torchInstalled())
        return self._ready

    def ensure(self) -> bool:
        if self.ready():
            return True
        if self._asked:
            return False
        self._asked = True
        try:
            import PyTorchUtils
        except ImportError:
            slicer.util.errorDisplay("DiffDenoise needs the PyTorch extension: install it from the Extensions Manager.")
            return False
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
            askConfirmation=True, torchVersionRequirement=">=%s" % MINIMUM_TORCH_VERSION)
        return torch is not None


class DiffDenoiseWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.panel = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DiffDenoise.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        for selector in (self.ui.inputSelector, self.ui.outputSelector, self.ui.trainVolumesSelector):
            selector.setMRMLScene(slicer.mrmlScene)
        self.logic = DiffDenoiseLogic()
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()
        self.panel = Panel(self.ui, self._parameterNode, self.logic, TorchDependency(), slicer.util.errorDisplay)
        self.panel.setup()

    def cleanup(self) -> None:
        if self.panel is not None:
            self.panel.cancel()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        if self.panel is not None:
            self.panel.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, parameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self._parameterNode = parameterNode
        if self.panel is not None:
            self.panel.params = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
            self.onParameterNodeModified()

    def onParameterNodeModified(self, caller=None, event=None) -> None:
        if self.panel is not None and self._parameterNode is not None:
            self.panel.update_from_parameters()
            self.panel.refresh()


class DiffDenoiseLogic(ScriptedLoadableModuleLogic, DenoiseLogic):
    """Scripting entry point, e.g. `DiffDenoiseLogic().process(volume, mode="fast")`."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        DenoiseLogic.__init__(self, temp_root=slicer.app.temporaryPath)

    def getParameterNode(self):
        return DiffDenoiseParameterNode(super().getParameterNode())

    def process(self, inputVolume, outputVolume=None, mode="fast", model="", device="auto",
                waitForCompletion=True):
        """Denoise `inputVolume`; with waitForCompletion=False return the running job (connect to its signals)."""
        job = self.denoise_job(inputVolume, DenoiseSettings(mode=mode, model=model, device=device), outputVolume)
        job.start(wait_for_completion=waitForCompletion)
        return job.outcome if waitForCompletion else job


class DiffDenoiseTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_FastModeOnCPU()
        self.setUp()
        self.test_PreviewSlice()

    def _noisyVolume(self):
        """(clean, noisy, volume node): a bright square in a 12-slice volume with 2 mm slices."""
        import numpy as np

        rng = np.random.default_rng(0)
        clean = np.zeros((12, 64, 64), np.float32)
        clean[:, 16:48, 16:48] = 200.0
        clean[:, 28:36, 28:36] = 400.0
        noisy = (clean + rng.normal(0.0, 40.0, clean.shape)).astype(np.float32)
        ijkToRas = np.array([[-0.8, 0, 0, 20.0], [0, -0.8, 0, -15.0], [0, 0, 2.0, 7.5], [0, 0, 0, 1]])
        return clean, noisy, slicer.util.addVolumeFromArray(noisy, ijkToRas, name="noisy")

    def test_PreviewSlice(self):
        import numpy as np

        self.delayDisplay("Previewing the slice shown in the Red view")
        _, _, inputVolume = self._noisyVolume()
        slicer.util.setSliceViewerLayers(background=inputVolume, fit=True)
        redNode = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceNode()
        redNode.SetSliceOffset(7.5 + 2.0 * 5)  # the centre of slice k = 5
        logic = DiffDenoiseLogic()
        outcome = logic.preview_job(inputVolume, DenoiseSettings(device="cpu")).start(wait_for_completion=True).outcome
        self.assertEqual(outcome.status, "done", outcome.message)
        preview = slicer.util.arrayFromVolume(outcome.output_volume)
        self.assertEqual(preview.shape, (1, 64, 64))
        whole = slicer.util.arrayFromVolume(logic.process(inputVolume, mode="fast", device="cpu").output_volume)
        np.testing.assert_allclose(preview[0], whole[5], rtol=1e-4, atol=0.05)
        self.delayDisplay("Test passed: slice 5 previewed in place")

    def test_FastModeOnCPU(self):
        import numpy as np

        self.delayDisplay("Denoising a synthetic noisy volume with the Fast mode on the CPU")
        clean, noisy, inputVolume = self._noisyVolume()

        outcome = DiffDenoiseLogic().process(inputVolume, mode="fast", device="cpu")

        self.assertEqual(outcome.status, "done", outcome.message)
        outputVolume = outcome.output_volume
        outputMatrix, inputMatrix = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        outputVolume.GetIJKToRASMatrix(outputMatrix)
        inputVolume.GetIJKToRASMatrix(inputMatrix)
        np.testing.assert_allclose(slicer.util.arrayFromVTKMatrix(outputMatrix),
                                   slicer.util.arrayFromVTKMatrix(inputMatrix))
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(inputVolume), noisy)
        denoised = slicer.util.arrayFromVolume(outputVolume)
        self.assertEqual(denoised.shape, noisy.shape)
        errorBefore = np.sqrt(np.mean((noisy - clean) ** 2))
        errorAfter = np.sqrt(np.mean((denoised - clean) ** 2))
        self.assertLess(errorAfter, 0.8 * errorBefore)
        self.delayDisplay("Test passed: RMSE %.1f -> %.1f" % (errorBefore, errorAfter))
