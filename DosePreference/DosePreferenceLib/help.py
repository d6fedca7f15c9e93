"""The DosePreference module's help and acknowledgement texts (HTML, shown in Slicer's module panel)."""

HELP_TEXT = """
<p>Predicts a 3D dose for a planning CT and its structures with the AI model shipped with the
extension (head-and-neck IMRT, trained on OpenKBP), and lets you steer it with two preference sliders.</p>
<ol>
<li><b>Inputs</b>: select the CT and the segmentation. The table lists each segment with the structure
name the model uses (matched automatically, e.g. <i>Lt Parotid</i> &rarr; <i>Parotid_L</i>,
<i>PTV7000</i> &rarr; <i>PTV_70</i>), its role (target, OAR, body, ignored) and, for targets, the
prescription in Gy; double-click a name or a prescription to correct it, pick the role from its list.
A red warning names what is missing: at least one target (PTV) with a prescription is required. OARs the model knows but the segmentation lacks are
listed; they are treated as absent.</li>
<li><b>Predict dose</b>: the first click installs missing or too old Python packages after one question
that lists them (PyTorch through the PyTorch extension when it is installed, and MONAI), loads the model and
predicts; CPU is enough. The progress dialog's <i>Cancel</i> stops it between steps.
After the network, a calibration fitted on training plans (from the model card) brings a dose whose level
in the highest target lies outside the training plans' range back onto it, raises the cold part of
each target toward its prescription and lowers the OARs' hottest voxels outside targets: the network's dose
is smooth where a plan is steep. The status line warns of an OAR far larger or smaller than any in the
training cases (most likely another structure under its name), which the network would misread, and of
targets reaching beyond the model's field (about 50 &times; 31 &times; 32&nbsp;cm), where the dose is 0.
The dose lies on a grid of its own, as a planning system keeps an RTDOSE: the CT's voxels binned to about
the <i>Dose grid</i> spacing (default 2.5&nbsp;mm; 0 = the CT's grid), aligned with the CT, over the body; its DVH
weighs the structures' boundary voxels by their partial volume. On a 512 &times; 512 CT this keeps a slider change
near 0.3&nbsp;s. The dose appears over the CT with the dose colour table (0 to 110&nbsp;% of the highest prescription),
under the CT's study in the Data module, tagged as an RT dose (so SlicerRT's modules accept it).</li>
<li><b>Preferences</b>: one slider per preference of the model, from its model card; for the shipped model
<i>OAR sparing</i> and <i>PTV homogeneity</i> (&minus;1 to 1, 0 = the typical plan of the training data) re-predict the dose, isodose lines and DVH once a dose was predicted, each
time the slider rests for 150&nbsp;ms (only the slider-dependent half of the network runs again, on a
worker thread, so the views stay responsive while it computes).
Their tooltips quote the model card. <i>Reset</i> sets every slider to 0.</li>
<li><b>Several plausible doses</b>: set <i>Model</i> to <i>diffusion</i>, choose the number of <i>Samples</i> and a
<i>Seed</i>, and press <i>Predict dose</i>. A diffusion model (<code>Resources/Models/dose_diffusion_v1.pt</code>)
draws that many doses around the preference model's at the sliders' values (the same seed gives the same doses):
the output dose is their mean, a second volume (<i>&lt;dose&gt; spread (5-95 %)</i>, not an RT dose) holds the
width of their voxel-wise 5&ndash;95&nbsp;% band in Gy, where the prediction is unsure, and the DVH chart shows
each structure's band across the samples as two dotted curves. Drawing takes about a second per sample on a
2-core CPU, so with this model a slider change waits for the next <i>Predict dose</i>. The model card says how
well the band holds the clinical dose on the validation patients.</li>
<li><b>DVH editing</b>: shapes the dose by its DVH, with a second model that predicts the dose from a
desired DVH (<code>Resources/Models/dose_dvh_v3.pt</code>, loaded on first use). Once a dose was predicted,
pick a structure and press <i>Edit DVH</i>: its desired curve appears in the DVH chart, dashed with
markers, and the plot view switches to moving points; drag the markers up or down (the doses stay
where they are; the curve is kept between 0 and 100&nbsp;% and non-increasing). Each time the curve
rests for 150&nbsp;ms, on the worker thread, the dose before editing is changed by what the desired DVH
(edited curves as drawn, the other structures as in the dose before editing) asks: the model's dose for the
desired DVH less its dose for the DVH before editing, scaled by the card's per-structure gain, is added to it,
so no edit changes nothing and an edit moves the other structures only as the trade-off does. The chart shows
the new DVH solid and the desired curves of the edited structures dashed; the status line gives each edited
structure's mean dose and D0.1cc against what its curve asks (a curve out of reach shows there).
<i>Undo</i> takes the last change back, <i>Reset</i> drops every edit (the dose before editing again).
Releasing <i>Edit DVH</i> returns the plot view to panning; moving a slider or <i>Predict dose</i>
discards the edits. Only the curve with markers is read: the plot view lets the solid curves be dragged
too, but such a move is ignored and redrawn at the next prediction.</li>
<li><b>Display and DVH</b>: isodose lines at the given percentages of the highest prescription
(default 30, 50, 70, 80, 90, 95, 100, 105&nbsp;%), drawn as outlines of an isodose segmentation.
The DVH chart (one curve per structure, in segment colours) and the metrics table (volume, Dmean,
Dmax, Dmin, D0.1cc, D2, D50, D95, D98; for targets HI, Paddick CI, V100&nbsp;% and V95&nbsp;%; for
organs V20, V30, V50&nbsp;Gy) appear in the plot and table views. A <i>reference dose</i> (e.g. the clinical RTDOSE) adds its
DVH as dashed curves; without a prediction, selecting it shows its own DVH.</li>
<li><b>Export</b>: writes the output dose as RTDOSE (in the CT's DICOM study and frame of reference
when the CT was loaded from DICOM, new UIDs otherwise) with the RTPLAN it references (a minimal plan that says
the dose is a prediction: research intent, unapproved, the prescriptions, no beams) and its DVH and metrics as
CSV into the chosen folder. Existing files are overwritten only after you confirm.</li>
</ol>
<p>Python console: <code>logic = slicer.util.getModuleLogic("DosePreference")</code> (or
<code>DosePreference.DosePreferenceLogic()</code>), then
<code>result = logic.predict(ctNode, segNode, oarSparing=0.5)</code> (or <code>sliders={"oar_sparing": 0.5}</code>); <code>result.doseNode</code>,
<code>result.dvh.metrics</code>; <code>logic.computeDVH(ctNode, segNode, doseNode)</code> gives the DVH of
any dose; <code>logic.predictFromDVH(ctNode, segNode, {"Parotid_L": (doseGy, volumePct)},
doseNode=result.doseNode)</code> predicts from edited DVH curves;
<code>logic.predictor().mirror_average = True</code> also runs the network on the left-right mirrored case
and averages the two doses at every slider position (twice the time per slider change); the shipped card's
<code>mirror_neutral</code> does that at neutral sliders only, once per case, and carries the correction to every
slider position (one network run per slider change).
Batch over a folder of DICOM studies:
<code>DosePreference/Scripts/batch_predict.py</code> (see the README).</p>
<p>Needs Slicer 5.10 or newer (tested with the Python packages Slicer 5.10 and 5.12 bundle). SlicerRT, which the
extension depends on, loads DICOM RTSTRUCT and RTDOSE and shows our doses in its Dose Volume Histogram and Isodose
modules like imported ones.</p>
<p>The predicted dose is a model estimate for research, not a deliverable plan.</p>
"""

ACKNOWLEDGEMENT_TEXT = """
Developed in the SlicerDoseAI project. The module layout follows the scripted module template of 3D Slicer;
dose volumes follow the conventions of SlicerRT (DICOM-RT import), so that its Isodose and Dose Volume
Histogram modules work on them too.
"""
