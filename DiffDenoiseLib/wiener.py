"""Collaborative filtering of the noisy image (BM3D's two steps), with the pipeline's result as the pilot.

The pipeline's result (Full's fused SRDS, Fast's student) is a good but imperfect estimate
m of the clean image. It is a better guide than the noisy image y for the second step of
BM3D (Dabov et al. 2007, "Image denoising by sparse 3D transform-domain collaborative
filtering"): for every reference patch, the patches whose *pilot* looks most alike are
stacked into a group; y's group is taken into a 3D transform (a 2D DCT of each patch, a
1D DCT across the group), each coefficient is kept in the share p^2 / (p^2 + s) of the
pilot's coefficient p (s the noise variance), and the filtered patches go back to their
places, averaged with weights 1 / (s * sum of squared gains) (a Kaiser window within the patch).

Similar patches repeat the signal and not the noise, so the group's 1D transform gathers
the signal into few coefficients where the pilot says there is signal and spreads the
noise over all: much of y's fine structure comes back without its noise. The noise
variance is the image's own noise curve at the pilot's intensity (noise.py), so
Poisson, Gamma and Rician noise are covered too.

Spatially correlated noise (`correlated_noise=True`) is not spread evenly over the
coefficients: it is strong at low spatial frequencies, and patches that overlap or lie close
share it, so it does not average out across the group either. There each coefficient of the
group's 3D transform gets its exact noise variance, from the noise's covariance and the members'
positions (covariance.py, after Maekinen et al. 2020); the covariance is read on the image, in the
windows where the pilot is flattest. Measured on the benchmark's correlated noise, against the
earlier variances read on the residual y - m in the same groups: on the three 2D images hard
thresholding and then the Wiener step guided by it gained 0.4 to 1.5 dB (and beat BM3D given the true
spectrum by 0.2 to 0.5 dB on two of them); on the two volumes, the Wiener step of a 2.5D result
-0.1 and +0.4 dB (the brain crop has no flat window, so anatomy adds to the covariance read). A 2.5D result,
which keeps little of the noise, now has the covariance read on y - m instead (`covariance_on_residual`).

BM3D's first step, `collaborative_hard_threshold`, is here too: groups matched on y itself,
coefficients below HARD_THRESHOLD noise std dropped; it thresholds each patch's Haar transform, as BM3D
thresholds a wavelet's, each coefficient's noise under white noise (or noise whose shape it reads) the curve where
its basis patch lies, under correlated noise the exact one of its group. Its estimate owes nothing to the
networks, and under white noise the pipeline averages it with a 2D model's result before the Wiener filter: their
errors differ, and the average is a better pilot than either.

For a volume with white noise, `volumetric_filter` runs both steps on cubes instead (BM4D, Maggioni
et al. 2013): 4x4x4 cubes, matched in the slice and three slices either way, take in that the anatomy
goes on from slice to slice, which 2D patches gathered from neighbouring slices use far less. Guided
by its own first step, without the networks, it beat every use of the networks' result measured on
the benchmark's volumes, so the pipeline gives a 2.5D model's volume under white noise to it alone. Where
strong noise may be correlated it reads the noise's shape on the volume and spreads the noise curve's variance
over each group's coefficients as that shape has it (SHAPE_ROUNDS), its first step matching y's cubes corrected
for the noise that near cubes share (`_shared_noise`), and where that shape correlates neighbouring voxels its
first step thresholds higher and its Wiener step takes cubes of 5 and searches wider (`reads_correlated`). Its
Wiener step weighs the noise less where the estimate stands clear of it (CUBE_WEIGHT_OF_NOISE), as BM4D does.

For a volume the candidates also come from the neighbouring slices (`context` slices on
each side, as BM4D's groups do), whose noise is independent: a 2.5D slice has more alike
patches to average than a 2D image. Under white noise only the centre slice's patches are written back; under
correlated noise every group goes back to each slice its members lie in (BM4D's aggregation, `spreads`), so a
slice also gets the groups of the reference slices within `context` of it.

Where no shape is read the noise is white, yet two members of a group that overlap still share the noise of their
common voxels: the filters give each coefficient of the group's transform its exact variance under white noise
(`_white_table`, as under correlated noise), where one variance per group took the members as independent.

Block matching runs on the pilot, whose noise is low, with a search window of
2 * SEARCH_RADIUS + 1 voxels a side (wider under correlated noise). Everything runs in torch, on the device given.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from DiffDenoiseLib.covariance import coefficient_covariance, estimate_noise_covariance, group_variance, noise_shape
from DiffDenoiseLib.noise import Curve, refined_noise_curve

# Measured on the benchmark's images (Full's pilot): groups of 8 or 32 patches lost 0.05 to 0.1 dB on the volumes
# against 16; references every 2nd or every voxel gained up to 0.02 dB for 2 to 3 times the time; a search radius
# of 12 gained 0.01 dB for twice the time.
PATCH = 8  # side of the patches, as in BM3D's second step
GROUP = 16  # patches in each group
STEP = 3  # spacing of the reference patches
SEARCH_RADIUS = 8  # the search window reaches this many voxels either way of the reference patch
# A 2D image's Wiener step under white noise (or a shape read) takes groups as large as their similar members allow
# (`_similar_group_sizes`, as under correlated noise below): up to WIENER_GROUP_2D patches within WIENER_RADIUS_2D,
# halved while a member lies beyond WIENER_SIMILARITY times the curve's noise variance at the reference (a mean
# squared difference on the pilot), down to GROUP. Measured on the three 2D images' test crops and 3 held-out
# regions each (the chain of the pipeline: hard thresholding, pilot a tenth the network's result, then this step;
# two sets of fresh draws, 2026-12-07), against GROUP within SEARCH_RADIUS: Gaussian 25/255 +0.41 and +0.44 dB
# (693 CT), +0.06 and +0.11 (shoulder MRI), -0.04 and -0.02 (chest X-ray); Gaussian 6/255 +0.02 and +0.05, -0.02 and
# -0.02, 0.00 and -0.01; Poisson 200 +0.06 and +0.05, -0.02 and -0.02, -0.02 and -0.02; Gamma 100 (one set, 0.5
# times the variance) +0.09, 0.00, 0.00. Every test crop gained (-0.05 to +0.27; the held-out strips that lost are
# the X-ray's lung and the MRI's, whose texture the pilot smooths). Within 0.5 times the variance 0.01 to 0.02 less;
# up to 256 within +-12 (0.5) +0.51, +0.08, -0.04 under 25/255 but -0.04 on the MRI under 6/255 for 3 times the time
# (a 128 x 128 slice, every 3rd voxel: 0.1 s with GROUP, 1.5 s with 128, 4.8 s with 256); within +-8 less on the CT
# (+0.37, +0.05, 0.00); within +-14 the MRI and the X-ray lost up to 0.05 under weak noise. The noise weighed by 0.7
# where the pilot stands clear of it (`_shrink`) gained 0.03 to 0.04 on the MRI and the X-ray under Poisson 200 and
# Gamma 100 and lost as much on the CT: 1 stays. The members' noise taken as independent (no overlap counted) lost 0.1
# on the CT and gained 0.03 to 0.04 on the MRI. References every WIENER_STEP_2D-th voxel instead of every 3rd (the
# same regions, one set of draws, 25/255, 6/255 and Poisson 200): every 4th -0.02 to +0.00 dB for 0.43 times the
# time, every 5th -0.03 to 0.00 for 0.22 times (0.4 s a 128 x 128 slice); groups of up to 64 every 3rd voxel, as fast,
# lost 0.15 on the CT under 25/255 (+0.01 on the others).
WIENER_GROUP_2D = 128
WIENER_RADIUS_2D = 10
WIENER_SIMILARITY = 0.25
WIENER_STEP_2D = 5
# Fast takes groups of up to SHALLOW_WIENER_GROUP_2D (`pipeline.deep_wiener_groups`), cut the same way down to GROUP.
# Measured as above (the chain of the pipeline, the three 2D images' test crops and 3 held-out regions, one set of
# fresh draws, 2026-12-07), against WIENER_GROUP_2D: the Wiener step 5 to 7 times faster (0.35 s for the 4 regions
# against 1.6 to 2.1), the 693 CT -0.30 dB under Gaussian 25/255 (its test crop -0.15), -0.07 under 6/255, -0.02
# under Poisson 200 and Gamma 100; the shoulder MRI and the chest X-ray -0.04 to +0.01. GROUP within SEARCH_RADIUS
# every STEP (as fast) lost 0.43 on the CT under 25/255; up to 64, 2.5 times faster than 128, lost 0.16. References
# every 3rd voxel with 128 gained 0.00 to 0.03 (the MRI and the X-ray) for 3 times the time.
SHALLOW_WIENER_GROUP_2D = 32
# A lone slice's Wiener step under white noise filters each group's deviations on the pilot group's own axes, as the
# volumetric filter's (`_shrink_on_group_covariance`, CUBE_WIENER_ON_GROUP_AXES below), the noise's covariance in a
# patch following the curve from voxel to voxel (under Poisson and Gamma noise one variance per patch lost up to 1.1
# dB where the skull meets air) and weighed WIENER_2D_NOISE_SCALE times. Measured through the pipeline (2026-12-07)
# against the DCT, the pilot a tenth the networks' result, on the three 2D images' test crops and 3 held-out regions
# (fresh draws; Gaussian 6 and 25/255, Poisson 200, Gamma 100), on average and at worst: Fast +0.44 (+0.21) dB on the
# 693 CT, +0.05 (-0.16) on the shoulder MRI, +0.03 (-0.05) on the chest X-ray, and on slices of the two volumes taken
# as 2D images +0.39 (+0.15, the InVesalius CT) and +0.13 (-0.03, Colin27). Full, the scale 1, 1.3, 1.7 and 2.2: the
# 693 CT +0.11, +0.29, +0.43, +0.53 (4 regions); the MRI +0.06, +0.03, -0.01 and the X-ray +0.04, +0.02, -0.04 (test
# crop and one region; not 2.2). The CT's flat tissue, whose pilot keeps some noise in its deviations, wants the noise
# weighed more, the MRI's and the X-ray's texture less: 1.7 takes most of the CT's gain for a few hundredths of a dB
# on the others. A weight chosen per region by Stein's risk estimate chose poorly: with the pilot held fixed +0.05 on
# average against +0.24 for the best per region (the pilot follows y's noise, which that estimate cannot see); by
# Monte-Carlo SURE through both steps (Gaussian 25/255, Poisson 200; over a weight of 1) the CT +0.25 against +0.33
# for 1.7 and +0.42 for the best, the X-ray 0.00 against -0.10: the blind curve's error in the noise's variance
# outweighs the differences it must tell apart. The pipeline chooses each image's weight by recorrupted pairs
# (noise_weight.py); WIENER_2D_NOISE_SCALE is the weight of a call that does not choose.
WIENER_2D_ON_GROUP_AXES = True
WIENER_2D_NOISE_SCALE = 1.7
LEAST_LEVEL_IN_A_PATCH = 0.02  # of the patch's mean: the noise's covariance in a patch stays invertible
# Under correlated noise (2.5D pilots of the benchmark's volumes, variances read on the residual) larger groups from
# a wider window gained 0.5 to 2 dB over 16 within +-8, at 2.4 times the time; 128 patches gained nothing more on one
# volume and lost on the other. References every 4th voxel there lost nothing (-0.04 to +0.01 dB) for 0.55 to 0.65
# times the time of every 3rd (under white noise they lost up to 0.17 dB). With the exact variances (2D images,
# hard thresholding then Wiener) groups of 32 lost 0.1 dB on average and 16 lost 0.33, for a quarter and a
# sixteenth of the time (then; a group's variances cost group^2 per coefficient now); every 3rd voxel gained 0.02.
# Once the variances cost group^2, larger Wiener groups within the slice paid (the same images, hard thresholding
# with groups of 32, which gained 0.01 over 64 in half the time): 128 +0.13 dB, 192 +0.20, 256 +0.25, 384 +0.36,
# at 2, 3.4, 5.5 and 20 times the time of 64; 192 costs what 64 did before the diagonal sums. Groups that reach
# across slices (a 2.5D model's pilot, the benchmark's two volumes) gained on one (+0.19) and lost on the other
# (-0.07 to -0.19) with 128 or 192, so they stayed at 64 (256: -0.26 and -0.28 dB on held-out slabs) until each
# was cut to its similar members (CORRELATED_WIENER_SIMILARITY_ACROSS_SLICES).
# Within the slice the gain went on up to groups of nearly the whole search window, where a group's order no
# longer matters (members sorted by position instead of distance: +-0.1 dB per image, 0.0 on average); a window
# of +-10 voxels and references every 6th voxel then give most of it for less time. Measured on held-out
# regions of the three 2D images (the strips around the test crops, correlated 1.2, fresh draws; 128 x 67 to
# 128 x 84 voxels) against 192 within +-12 every 4th voxel (26.65 dB on average, 1.6 s a region): 256 +0.09,
# 384 +0.26, 512 +0.38 (6 times the time) within +-12; 400 within +-10 every 4th +0.41 (4.3 times), every 6th
# +0.39 (1.8 times), every 8th +0.29; 354 within +-9 +0.34, 500 within +-11 +0.40 (3.3 times). On tissue-filled
# crops (the centre slices of the volumes' 8 held-out slabs through the 2D path) 400 within +-10 every 6th gained
# +0.12 dB on average over 192 (Colin27 -0.01, the InVesalius CT +0.25); 600 within +-12 0.02 less, 3 times
# the time; a second Wiener pass on the first's result +0.03 for 1.8 times.
# With those Wiener groups larger hard-thresholding groups (within +-12, every 4th voxel) gained on the same regions
# against 32: 64 +0.10 dB, 96 +0.14 (each image +0.01 to +0.26), 128 +0.15 (the chest X-ray -0.03), 256 -0.02,
# 16 -0.09; but 96 lost on the benchmark's test crops (Full: 693 CT -0.17, shoulder MRI -0.13, chest X-ray 0.00),
# whose tissue fills the crop where the strips are half background on the CT and the MRI, and on the tissue-filled
# crops above (-0.19 dB): 32 stays.
CORRELATED_HARD_GROUP = 32
CORRELATED_WIENER_GROUP = 400
CORRELATED_WIENER_GROUP_ACROSS_SLICES = 128
CORRELATED_HARD_SEARCH_RADIUS = 12
CORRELATED_STEP = 4
CORRELATED_WIENER_RADIUS_2D = 10  # the search window and reference spacing of the Wiener step within the slice
CORRELATED_WIENER_STEP_2D = 6
# A group of the 2D Wiener step gathers every patch within +-10 of its reference: where the image changes (a skull's
# edge, air beside tissue) most of them differ from it. Each group is now as large as its similar members allow (a
# mean squared difference on the pilot within CORRELATED_WIENER_SIMILARITY times the noise variance R(0)): 400 or
# its halvings down to 25. Measured on the three 2D images' test crops and 3 held-out regions each, the filters
# called alone (pilot Fast's network result, two sets of fresh draws, 2026-12-07), against every group of 400: under
# noise of a 0.5-pixel kernel +0.53 and +0.62 dB (693 CT; a strip of skull and air +1.1 and +1.7), +0.20 and +0.16
# (shoulder MRI), -0.13 and -0.12 (chest X-ray: every region down by 0.03 to 0.26, its lung texture everywhere
# leaving groups small where the whole window had gained); of a 1.2-pixel kernel +0.55 and +0.58, +0.15 and +0.12,
# -0.07 and -0.10. Within 0.25 R(0) (0.5-pixel kernel) +0.61, +0.23, -0.21; within 2 and 4 +0.41 and +0.28, +0.16
# and +0.15, -0.11 and -0.06; fixed groups of 32 within +-19 every third voxel (BM3D's) +0.32, -0.02, -0.06, of 128
# within +-16 every fourth +0.13, -0.09, -0.17. Told the true covariance, the step had trailed BM3D's Wiener step on
# our first step by 0.41 dB on the 693 CT, 0.07 on the shoulder MRI, and led it by 0.21 on the chest X-ray.
CORRELATED_WIENER_SIMILARITY = 1.0
CORRELATED_WIENER_HALVINGS = 4
# The Wiener step's groups across slices (a 2.5D model's result matching them) gained from a wider window, on the
# benchmark volumes' 8 held-out slabs (correlated 1.2, fresh draws; Full, Fast in brackets) against +-12: +-20
# Colin27 +0.03 dB (+0.02), the InVesalius CT +0.21 (+0.22) for 1.15 times the time; +-24 +0.03 and +0.23; +-16
# (Fast) +0.00 and +0.15; +-32 +0.01 and +0.22; +-6 and +-8 lost 0.15 to 0.46, with groups of 128 too; groups of
# 48 or 80 within +-20 -0.00 to -0.04. The CT's flat-tissue bias there went -1.44 -> -1.85 HU (antithetic pairs).
CORRELATED_WIENER_RADIUS_ACROSS_SLICES = 20
# Those groups too are as large as their similar members allow (within CORRELATED_WIENER_SIMILARITY_ACROSS_SLICES
# times R(0) on the pilot, 128 or its halvings down to 16): at the edge of a skull or between the gyri most of a fixed
# group of 64 differ from its reference, in flat tissue more than 64 are alike. Measured with Fast on the benchmark
# volumes' 4 held-out slabs (correlated 1.2, fresh draws, 2026-12-07) against fixed groups of 64: the InVesalius CT
# +0.04 to +0.18 dB (+0.11 on average), Colin27 -0.04 to +0.06 (+0.01), in about the same time; within 0.25 R(0)
# +0.05 on the CT and -0.02 on Colin27, within 1 or 2 R(0) -0.04 and -0.06 on Colin27; up to 256 within 0.5 R(0)
# +0.16 on the CT and -0.00 on Colin27, for 1.7 times the time.
CORRELATED_WIENER_SIMILARITY_ACROSS_SLICES = 0.5
CORRELATED_WIENER_SMALLEST_ACROSS_SLICES = 16
# Cubes instead of patches gathered across slices (BM4D's Wiener stage, 5x5x5 cubes, told the true spectrum, guided by
# the student's result) on the same slabs, 9 slices deep (2026-12-05): Colin27 +0.40 dB over Fast (27.37 -> 27.77), the
# InVesalius CT -0.75 (30.98 -> 30.23, one slab -2.7); averaged with this step's image, no better than the better
# one. Choosing per volume would need a risk estimate that holds under correlated noise. BM4D's Wiener stage on 8x8
# patches one slice deep, guided likewise, gained as much on Colin27 (+0.30) and lost 0.83 on the CT, so Colin27's
# gain is not the cubes'; nor is it the covariance: told the true one, this step changed by -0.03 (Colin27) and
# -0.02 dB (the CT), the read one scaled by 0.6, 0.8 or 1.25 by -0.31 to +0.04. Matching on the student's result
# lost 0.21 and 1.83 dB, groups of 32 within +-3 0.06 and 0.95. What BM4D does that this step did not is aggregate
# each group into every slice its members lie in. So each group of the Wiener step across slices now goes back to
# every slice its members lie in (`spreads`), and the reference slices within reach of a slice feed it too: on the
# same slabs Fast gained +0.11 dB on Colin27 and +0.06 on the CT (7 of 8 slabs), Full +0.11 and +0.08 (all 8), over
# writing back the reference slice's own patches alone. A whole volume needs no more reference slices for it, a
# slice range 1 + 2 * reach times as many (Fast 3.9 -> 14.8 s per benchmark test slice). A second pass of this step
# after it (the same slabs, Fast, 2026-12-05) did not pay: guided by the first pass's image (matching and gains)
# Colin27 -0.04 dB, the InVesalius CT -1.56 (-0.4 to -4.2 per slab: that image's errors follow the noise, as the
# student's do); matched on the blind-spot estimate again with the gains from the first pass's image, -0.02 and
# +0.14 (one CT slab +0.66, the other seven -0.10 to +0.06), for 2.5 times the step's time.
# the coefficient table covers every offset two members of a group can have: twice the widest window's radius
CORRELATED_TABLE_REACH = 2 * max(CORRELATED_HARD_SEARCH_RADIUS, CORRELATED_WIENER_RADIUS_2D,
                                 CORRELATED_WIENER_RADIUS_ACROSS_SLICES)
# Hard thresholding under correlated noise, then the Wiener step (the benchmark's three 2D images, exact variances):
# 3.5 noise std gained 0.14 dB on average over 2.7 and 0.06 over 3.0. With the Wiener groups of 400, 3.0 read
# +0.13 dB on the tissue-filled held-out crops (Colin27 +0.32, the InVesalius CT -0.06) and -0.12 on the strips
# (3.25: -0.04), 4.0 -0.19 on the crops: 3.5 stays. With the Haar first step (2026-12-07, the 2D images' test crops
# and 3 held-out regions, the filters called alone) 3.0 gained +0.07 to +0.12 dB under a 0.5-pixel kernel's noise and
# lost 0.10 to 0.20 under 1.2, 3.8 the reverse (-0.05 to -0.07, +0.01 to +0.06); a threshold following the noise's
# neighbour correlation (3.0 at 0.3, 3.8 at 0.75, as `wiener_weight_of_noise` follows it) then gained only +0.02 on
# average on fresh draws (-0.07 to +0.08): 3.5 stays.
CORRELATED_HARD_THRESHOLD = 3.5
# The 2D Wiener step's gains under correlated noise weigh the noise's exact variance less where the noise is mildly
# correlated and the pilot's coefficient stands clear of the noise (`wiener_weight_of_noise`, `_shrink`; presumably
# because the hard-thresholding estimate guiding them is smoother than the image there, so its larger coefficients
# understate the anatomy's: not measured apart). Measured on the three 2D images' test crops and held-out strips (fresh
# draws, std 0.1, both steps with the covariance read blind, from which the rule reads 0.3 to 0.6 there), against weight
# 1: under noise of a 0.5-pixel kernel (neighbours' correlation 0.26) the weight 0.3 gained on all 15 regions (+0.16 to
# +1.23 dB, +0.41 on average) with SSIM as before on average (-0.021 to +0.019); one weight for every coefficient, as
# p^2 / (p^2 + w s), gained as much at 0.45 (+0.44; +0.37 and +0.41 on two more sets of draws; every weight from 0.45 to
# 0.8 gained on all 15 regions; told the true covariance 0.6 gained +0.21) but left more noise where the pilot is flat
# (SSIM -0.004 on average, down to -0.032 on the strips that are half background). Under a 0.7-pixel kernel's noise
# (0.58) that one weight gained +0.11 at 0.7 (-0.17 to +0.37) and +0.07 at 0.45 (-0.55 to +0.64), on 12 regions, and
# this rule (reading 0.68 to 0.93 there) +0.05 on 15 (-0.03 to +0.10, SSIM -0.002); under a 1.2-pixel kernel's (0.84)
# 0.45 lost 0.56 on average (-1.13 to +0.38, 10 regions), and the read weight is 1 there. Hard thresholding at 3.0
# instead of 3.5 added +0.05 (at 2.7 -0.06). The volumetric filter's Wiener step, whose noise shape spreads the curve's
# variance, lost with one lower weight for every coefficient (0.45: -0.38 dB on Colin27's held-out slabs under a
# 0.5-pixel kernel, -0.70 on the CT's), but gains with this rule's form at a fixed weight (CUBE_WEIGHT_OF_NOISE).
# With the Haar first step and similar-sized groups (2026-12-07, the 2D images' test crops and 3 held-out regions,
# kernel 0.5, the filters called alone) 0.45 lost 0.04 to 0.05 dB and 0.2 gained 0.00 to 0.04: 0.3 stays.
MILDLY_CORRELATED_WEIGHT_OF_NOISE = 0.3
MILD_NEIGHBOUR_CORRELATION = 0.3
WIDE_NEIGHBOUR_CORRELATION = 0.75
# The Wiener step leaves out of a reference's group the patches of its own slice shifted by this many voxels or
# less: such a near copy shares most of its noise with the reference, so it adds little to average. Measured on
# the benchmark's white noise (Full's pilot): +0.1 dB on average, -0.05 to +0.35 (a shift of up to 3: no better).
# The hard-thresholding step, matched on y itself, lost 0.1 to 0.3 dB with it.
NEAR_COPY_SHIFT = 1
KAISER_BETA = 2.0
# The volumetric filter (BM4D's cubes, Maggioni et al. 2013): cubes CUBE voxels a side and deep, matched within
# +-CUBE_SEARCH_RADIUS voxels in the slice and CUBE_SLICE_REACH slices either way, references every CUBE_STEP voxels
# in the slice and CUBE_SLICE_STEP slices; groups of CUBE_GROUP_HARD for hard thresholding (at CUBE_HARD_THRESHOLD
# noise std), CUBE_GROUP_WIENER for the Wiener step. Measured on the benchmark's two volumes under white noise
# (mean PSNR of 9 conditions against these numbers): cubes of 5 -0.16 dB, Wiener groups of 64 -0.05, 16 -0.01,
# reach of 2 slices -0.03, threshold 2.5 -0.18 and 3.3 -0.003 (2.7 -0.05), references every slice +0.00 for
# twice the passes, every 2nd voxel +0.05 for 1.6 times the time, search radius 7 +0.08 for 4 times. On the volumes'
# held-out slabs (4 white-noise conditions, 2026-12-04): every 2nd voxel +0.04, a second Wiener pass guided by the
# first -0.06 (Colin27 +0.02 to +0.12, the CT -0.04 to -0.35), cubes of 5 averaged with 4 +0.04, search radius 7 or
# reach of 4 slices +0.01.
CUBE = 4
CUBE_SEARCH_RADIUS = 5
CUBE_SLICE_REACH = 3
CUBE_STEP = 3
CUBE_SLICE_STEP = 2
CUBE_GROUP_HARD = 16
CUBE_GROUP_WIENER = 32
# Under white noise the Wiener step's groups are as large as their similar members allow (`_similar_group_sizes`, as
# a lone slice's are): up to CUBE_WIENER_GROUP cubes within the same search, cut to the members within
# CUBE_WIENER_SIMILARITY times the curve's variance at the reference (mean squared difference per voxel on the
# estimate), down to CUBE_GROUP_WIENER. Measured on the benchmark volumes' test slab and 3 held-out slabs (fresh
# draws, 2026-12-07) against groups of 32: the InVesalius CT +0.18 dB under Gaussian 25/255 (its test slab +0.30),
# +0.08 under Poisson 200, +0.04 under Gamma 100, +0.02 under Gaussian 6/255; Colin27 -0.003 to +0.014 (Rician 0.05
# -0.003); within 0.1 or 0.03 the same within 0.02 (0.2: Colin27 -0.04), groups up to 64 half the gain, up to 256
# +0.30 on the CT at 25/255 for 2.4 times the time of 128; references every 4th voxel lost 0.01 to 0.02. The step's
# time rises 1.5 (Colin27) to 3 times (the CT's flat brain, where most groups reach 128): a 128 x 128 slab's slice
# 1.6 -> 5 s; so Fast keeps groups of CUBE_GROUP_WIENER (`pipeline.deep_wiener_groups`). The same with the
# noise's shape read, where it reads white (Gaussian 25/255: +0.10 on the CT, +0.006 on Colin27); noise that
# `reads_correlated` keeps its groups.
CUBE_WIENER_GROUP = 128
CUBE_WIENER_SIMILARITY = 0.05
# Under white noise the Wiener step filters each group's deviations from its mean on the pilot group's own axes
# (`_shrink_on_group_covariance`, NL-Bayes's second step with the noise weighed by CUBE_WEIGHT_OF_NOISE's rule) rather
# than the cubes' DCT. Measured with Full on the benchmark volumes' test slab and 3 held-out slabs (fresh draws,
# 2026-12-07) against the DCT: Gaussian 25/255 Colin27 +0.18 to +0.22 dB, the InVesalius CT +0.32 to +0.44; Gaussian
# 6/255 +0.30 to +0.37 (+0.33 on average) and +0.15 to +0.29 (+0.21); Poisson 200 +0.29 to +0.31 and +0.21 to +0.46
# (+0.32); Gamma 100 +0.27 to +0.31 and (two slabs) +0.21 and +0.32. With a weight of the noise of 1 along every
# axis half the gain (25/255: +0.09 to +0.12 and +0.13 to +0.41); with the rule at 0.25 instead of 0.4 within 0.03.
# The filter takes 1.15 (Fast's groups) to 1.3 times (the deep groups) as long on 256x256 slices (an
# eigendecomposition per group: of its 64 x 64 covariance, or of its deviations' Gram matrix where that is smaller).
# Correlated noise, whose variance differs between coefficients and between pairs of members, keeps the DCT.
CUBE_WIENER_ON_GROUP_AXES = True
CUBE_HARD_THRESHOLD = 3.0
# The hard-thresholding step matches on y itself and finds better groups in a wider window (as in 2D below): +-9
# voxels gained 0.08 dB on average over +-5 on those 9 conditions (+0.34 on the head CT at Gaussian 25/255), for
# about 1.9 times the time of both steps; +-7 gained 0.05, +-12 0.10 for 3 times. The Wiener step's +-4 lost 0.02.
CUBE_HARD_SEARCH_RADIUS = 9
# The Wiener step weighs the noise in its gains by CUBE_WEIGHT_OF_NOISE where the estimate's coefficient stands clear
# of it (`_shrink`), as BM4D weighs it by 0.40 under white noise (its mu^2; 0.74 for a 0.5-pixel kernel's spectrum):
# a coefficient the estimate shows well above the noise is anatomy, shrunk less. On the benchmark volumes' test slab
# and 3 held-out slabs (fresh draws, 2026-12-06), against a weight of 1: Gaussian 25/255 +0.12 dB on the InVesalius
# CT and +0.08 on Colin27 (0.3 +0.13 on the CT, 0.2 +0.12, 0.5 +0.10 and +0.07), Gaussian 6/255 +0.10 (0.5) and
# +0.08, Poisson 200 +0.05 and +0.07, Gamma 100 +0.01 and +0.03; the noise scaled by 0.4 everywhere instead (BM4D's
# form) -0.11 on the CT at 25/255. Under a 0.5-pixel kernel's noise 0.4 and 0.5 are within 0.01 (below).
CUBE_WEIGHT_OF_NOISE = 0.4
# Where the noise may be correlated the volumetric filter reads its shape on the image: how the noise of a voxel
# spreads to its neighbours (the covariance on y minus a first-step estimate, where that estimate is flattest),
# per unit of what the noise curve reads there (`covariance.highpass_reading`); a group's coefficients then get the
# curve's variance at the group's intensity spread as that shape has it. So the level stays the curve's, which
# follows Poisson and Gamma noise's intensity, and noise that reads white gets a shape of one voxel: the filter of
# white noise. What the estimate kept of the noise goes missing from the residual, so the read starts from the
# first step of white noise and is taken again on the first step with each new shape, SHAPE_ROUNDS times, on the
# COVARIANCE_SLICES middle slices the shape is read on. On the benchmark volumes' held-out slabs (4 of each, fresh
# draws, 2026-12-06) against the filter of white noise: Gaussian 25/255, Poisson 200, Gamma 100 -0.11 to +0.12 dB;
# noise of kernel 0.4, 0.45 and 0.5 pixels (which read binning ratios of 1.4 to 1.7, 1.7 to 2.2, 2.7 to 3.0) +0.33
# and +0.72, +2.02 and +2.95, +4.75 and +6.47 (Colin27, the InVesalius CT). Against the exact variances read in the
# flattest windows of y (where they held anatomy, the first step again on the residual's): white noise +0.09 to
# +2.77 (those took Poisson and Gamma noise's level as one), kernel 0.4 and 0.45 +0.03 to +0.08, kernel 0.5 -0.09
# and -0.14 (three rounds -0.20 and -0.21, five -0.06 and -0.13).
SHAPE_ROUNDS = 4
# Where the shape read correlates neighbouring voxels by less than WHITE_NEIGHBOUR_CORRELATION (`reads_white`) the
# Wiener step takes white noise's spread; the first step keeps the shape. On the volumes' test slab and 2 held-out
# slabs (fresh draws, 2026-12-07, deep groups) against the shape in both steps: Gaussian 6/255 and 25/255, Poisson
# 200 and Gamma 100 (read -0.007 to +0.020) +0.00 to +0.01 dB on the InVesalius CT and +0.01 to +0.03 on Colin27
# (slabs -0.008 to +0.049); noise of kernels 0.3 and 0.35 at std 0.1 (read 0.000 to 0.048) +0.01 to +0.05, 0.35 at
# 0.05 +0.02 and +0.03; the whole filter 10 to 30 % faster (the shape's table gathers the variances of many more
# pairs of a group's members than white noise's). Kernel 0.4 (read 0.064 to 0.088) +0.02 on average but -0.05 to
# +0.10 by slab, and kernel 0.45 (read 0.126 to 0.150) -0.24 on the CT (its test slab -0.51): those keep the shape.
WHITE_NEIGHBOUR_CORRELATION = 0.05
CUBE_GROUP_HARD_CORRELATED = 32
# Where the noise's shape read correlates neighbouring voxels (`neighbour_correlation`) by
# VOLUMETRIC_CORRELATED_NEIGHBOUR_CORRELATION or more (`reads_correlated`), the Wiener step's cubes are 5 voxels a
# side (the first step's stay 4), as BM4D's Wiener stage has them: a 4-voxel cube's few coefficients each mix low
# and high frequencies, which correlated noise holds unequally. Measured on the benchmark volumes (correlated noise of
# std 0.1, fresh draws, 2026-12-06): guided by BM4D's first step (test slab and 3 held-out slabs, kernel 0.5) our
# Wiener step on cubes of 4 came out below that first step on the InVesalius CT (34.38 dB against 34.34 on average,
# 36.34 against 36.81 on the test slab; BM4D's Wiener stage 34.83); on cubes of 5 34.74, on 6 34.85 (Colin27 -0.01
# and -0.05); groups of 16 or 64, a search of +-7, references every 2nd voxel or slice, 5 slices' reach, weights of
# the noise of 0.6 or 1.5 moved it by -0.10 to +0.06. The whole filter, cubes of 5 against 4: kernel 0.5 (test slab
# and 5 held-out slabs; read 0.20 to 0.21) +0.35 dB on the CT (SSIM 0.931 -> 0.944) and +0.01 on Colin27 for 14 %
# more time; on the test slab and 2 held-out slabs kernel 0.45 (read 0.13 to 0.14) +0.13 and -0.03, 0.4 (read 0.07
# to 0.09) +0.05 and -0.06, Gaussian 6/255 and Gamma 500 on Colin27 (white noise whose shape the pipeline reads;
# read -0.03 to +0.02) -0.02 and -0.02, Gaussian 25/255 and Poisson 200 -0.09 and -0.10 on Colin27, +0.03 and +0.02
# on the CT; kernels 0.8 and 1.2, which the filter hardly touches at that std, -0.03 and 0.00. So below the
# threshold the cubes stay 4. With the cubes of 5 the first step's last run (the shape read) thresholds at
# CORRELATED_CUBE_HARD_THRESHOLD: 3.3 gained +0.12 dB on the CT and +0.02 on Colin27 over 3.0 (test slab and 4
# held-out slabs; 3.5 +0.13 and +0.01); 3.3 in every run of the first step +0.13 and 0.00 (2.7 -0.67 and -0.64,
# 3.6 +0.11 and -0.09, 4.0 -0.01 and -0.24), and under kernels 0.45 and 0.4, with cubes of 4, -0.12 to -0.17.
CORRELATED_WIENER_CUBE = 5
VOLUMETRIC_CORRELATED_NEIGHBOUR_CORRELATION = 0.15
CORRELATED_CUBE_HARD_THRESHOLD = 3.3
# There the Wiener step also searches within CORRELATED_CUBE_SEARCH_RADIUS voxels (BM4D's +-7), and wherever the
# noise's shape is read the first step's final run matches its groups afresh with the shape read, correcting each
# candidate's distance for the noise near cubes share (`_shared_noise`). Measured on the benchmark volumes' test slab
# and 3 held-out slabs (fresh draws, 2026-12-06), kernel 0.5, with the Wiener step's weight of the noise at 0.5
# (CUBE_WEIGHT_OF_NOISE, then for this noise only): the three together +0.18 dB on the InVesalius CT (34.57 -> 34.75;
# BM4D 34.76 on those slabs) and +0.08 on Colin27, the correction alone +0.07 and -0.01 (twice it +0.10 and -0.01),
# weight and search alone +0.08 and +0.08 (weights 0.3 to 0.4 within 0.01 of 0.5, 0.74 -0.04; +-8 0.00); at std 0.04
# +0.17 and +0.08,
# 0.02 +0.14 and +0.06, faint noise (kernel 0.6 at std 0.01, 0.5 at 0.006) +0.18 and +0.05, +0.28 and +0.10; kernels
# 0.45 and 0.4 +0.03 and 0.00 (CT), 0.00 and -0.02 (Colin27); Gaussian 6/255, Gamma 500 and Poisson 200 within 0.01;
# the filter's time under correlated noise about 15 % more. A phantom of smooth shapes loses by the weight (its
# error 6 % more), which real anatomy gains by (the tests measure both). Crossed with BM4D's stages on those slabs
# before the weight and search (with the correction): BM4D's Wiener stage on our first step gave 34.77 dB, ours on
# BM4D's first step 34.67, our own 34.65.
CORRELATED_CUBE_SEARCH_RADIUS = 7
SHARED_NOISE_CORRECTION = 1.0  # times the expected shared noise 2 B R(d) added to a candidate's distance
CUBE_TABLE_REACH = 2 * max(CUBE_SEARCH_RADIUS, CUBE_HARD_SEARCH_RADIUS, CORRELATED_CUBE_SEARCH_RADIUS)  # in-plane
# offsets two members' cubes can have
HARD_THRESHOLD = 2.7  # BM3D's first step: coefficients below this many noise standard deviations are dropped
# BM3D's first step matches on y itself, whose noise misleads the nearest few: a search window as wide as BM3D's
# (39 voxels a side) finds better groups. On the benchmark's three 2D images (the Wiener step after it, Full's
# pilot) +0.11 dB on average over +-8 and +0.52 under Gaussian 25/255 on the head CT, at twice the time of both
# steps; +-14 gained 0.09, and with it groups of 32, a threshold of 2.9 or a Haar transform across the group
# gained nothing more.
HARD_SEARCH_RADIUS = 19
REFERENCE_CHUNK = 2048  # reference patches filtered at once, which bounds the working memory
CORRELATED_REFERENCE_CHUNK = 128  # under correlated noise (group_variance bounds its own memory)
MATCH_REFERENCES_PER_TILE = 16  # references of a row whose candidates `_match` takes in one matrix product


def dct_matrix(size: int) -> torch.Tensor:
    """The orthonormal DCT-II of length `size` as a (size, size) matrix (float64)."""
    k = torch.arange(size, dtype=torch.float64)[:, None]
    n = torch.arange(size, dtype=torch.float64)[None]
    d = torch.cos(torch.pi * (2 * n + 1) * k / (2 * size)) * (2.0 / size) ** 0.5
    d[0] /= 2 ** 0.5
    return d


# Measured (2026-12-06) through the pipeline (Fast) on the three 2D images' test crops and 3 held-out regions each,
# fresh draws, the first step thresholding Haar coefficients, each coefficient's noise the curve where its basis
# patch lies (`_spread_over`, both steps), against the DCT with the patch's mean: Gaussian 6/255 +0.03, +0.27 and
# +0.11 dB (693 CT, shoulder MRI, chest X-ray), 25/255 +0.13, +0.17, +0.02, Poisson 200 -0.01, +0.12, +0.02, Gamma
# 100 -0.06, +0.11, +0.01, Rician 0.05 +0.02, +0.17, +0.02; at the same cost. A Haar coefficient covers 2 x 2 to
# 8 x 8 voxels: with the patch's mean the CT lost 0.42 (Poisson) and 0.73 (Gamma) where air, without noise, meets
# bone. With the true curve and the first step alone as the pilot (Gaussian 25/255) BM3D's biorthogonal 1.5 wavelet
# gained 0.01 dB more than the Haar and a Haar transform across the group nothing; on the volumetric filter's 4 x 4 x
# 4 cubes the Haar lost 0.02 to 0.13 dB (test slab and 3 held-out slabs of each volume) and `_spread_over` changed
# nothing (+-0.004), so the cubes keep the DCT and the patch's mean. Where the 2D filters read the noise's shape the
# first step reads it in the Haar transform too: Fast on the same regions under noise of a 0.4-pixel kernel +0.07,
# +0.18 and +0.02 dB, of 0.45 +0.27, +0.18 and +0.10, and on the shoulder MRI's test crop, whose Poisson 200 and
# Gamma 100 draws read a shape, +0.19 and +0.18 (11 of 12 regions up, one down by 0.05); on a synthetic texture that
# fills the image under Poisson noise (which reads no shape in the pipeline) the read shape smoothed more than with
# the DCT (1.35 to 1.64 times the white filters' error against 1.10 to 1.24). Under correlated noise (the exact
# variances, the table read in the Haar transform; the correlated-noise filters called on the same regions, pilot
# Fast's network result, 2026-12-07) it gained under noise of a 0.5-pixel kernel +0.34, +0.20 and +0.05 dB (all 12
# regions up), of 1.2 +0.15, -0.01 and +0.00.
def haar_matrix(size: int) -> torch.Tensor:
    """The orthonormal Haar transform of length `size` (a power of 2), fully decomposed, as a (size, size) matrix
    (float64): the mean, then the differences of halves, of quarters, and so on down to neighbouring voxels."""
    if size == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    pair = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    coarser = torch.kron(haar_matrix(size // 2), pair[:1])
    finest = torch.kron(torch.eye(size // 2, dtype=torch.float64), pair[1:])
    return torch.cat([coarser, finest]) / 2 ** 0.5


TRANSFORMS = {"dct": dct_matrix, "haar": haar_matrix}
FIRST_STEP_TRANSFORM = "haar"  # the 2D first step's within each patch (`_filter_slice_sums`)


@functools.lru_cache(maxsize=16)
def _transform_on(size: int, device: torch.device, dtype: torch.dtype, dims: int = 1,
                  kind: str = "dct") -> torch.Tensor:
    """The orthonormal transform (`kind` in TRANSFORMS) of a block `size` voxels a side in `dims` dimensions (the
    Kronecker product of its matrix `dims` times, acting on the block's voxels in row-major order) on `device` in
    `dtype`, made once: each chunk of references needs the group's, and building it and copying it over per chunk
    (about 1,000 times a volume) made a GPU wait on the copies."""
    line = TRANSFORMS[kind](size)
    matrix = line
    for _ in range(dims - 1):
        matrix = torch.kron(matrix, line)
    return matrix.to(device, dtype)


def collaborative_wiener(noisy: np.ndarray, pilot: np.ndarray, curve: Curve, context: int = 0, passes: int = 1,
                         indices: Optional[Sequence[int]] = None, device: Optional[torch.device] = None,
                         progress: Optional[Callable[[], None]] = None, correlated_noise: bool = False,
                         gains_from: Optional[np.ndarray] = None, covariance_on_residual: bool = False,
                         noise_shape: bool = False, deep_groups: bool = True,
                         noise_scale: Union[float, Sequence[float]] = WIENER_2D_NOISE_SCALE) -> np.ndarray:
    """The collaborative Wiener filter of the slices `indices` (all by default) of `noisy`, guided by `pilot`.

    `noisy` and `pilot` are (n, H, W), or (H, W) for one slice; the inputs are not modified. With
    `context` > 0 a slice's groups also gather patches from that many slices on each side (within
    the array), whose pilot must be there too. With `passes` > 1 each pass's result is the next
    one's pilot. `progress` is called after every reference slice (`wiener_reference_slices` of them; it may
    raise to stop the filter). With `correlated_noise` each coefficient's noise variance is the exact one of its
    group, from the noise covariance read where `pilot` is flattest (see above), on y - `pilot` with
    `covariance_on_residual` (for a pilot that kept little of the noise: covariance.py); with a `context` too,
    every group goes back to each slice its members lie in (`spreads`), so the slices within
    `context` of those wanted are reference slices too. `gains_from`, of `noisy`'s shape, sets the first pass's
    Wiener gains instead of `pilot`, which then only matches the groups: an estimate whose errors follow the noise
    at each voxel groups patches by their noise, yet may know the coefficients better. Returns (len(indices), H, W),
    or (H, W) for a 2D input, in float64. With `noise_shape` (a 2D model's slices, noise that may be mildly
    correlated though it reads white) the curve's variance is spread over each group's coefficients by the noise's
    shape, read on y - `pilot` (`_coefficient_table` with `shape`), with the settings of white noise. Without
    `deep_groups` a lone slice's groups under white noise (or a shape read) hold SHALLOW_WIENER_GROUP_2D patches at
    most, for a fifth of the time of WIENER_GROUP_2D's. A lone slice's Wiener step under white noise weighs the noise
    `noise_scale` times (WIENER_2D_NOISE_SCALE; noise_weight.py chooses it per image); given several weights it
    filters with each at once, the groups matched and their axes found once, and returns (weights, len(indices), H,
    W), or (weights, H, W) for a 2D input (one pass over lone slices under white noise only).
    """
    y3, m3, wanted = _checked("Wiener filter", noisy, pilot, context, indices)
    scales = tuple(float(scale) for scale in np.atleast_1d(noise_scale))
    if not scales or not all(scale > 0 for scale in scales):
        raise ValueError(f"the Wiener filter weighs the noise a positive number of times, got {noise_scale}")
    if len(scales) > 1 and (passes > 1 or context or correlated_noise or noise_shape):
        raise ValueError("the Wiener filter tries several weights of the noise only in one pass over lone slices "
                         "under white noise")
    g3 = None if gains_from is None else _checked("Wiener filter", noisy, gains_from, context, indices)[1]
    if passes < 1:
        raise ValueError(f"the Wiener filter needs 1 or more passes, got {passes}")
    n = y3.shape[0]
    guide = np.array(m3, dtype=np.float32)
    if noise_shape and context:
        raise ValueError("the Wiener filter reads the noise's shape only without context slices")
    if noise_shape:
        table = _coefficient_table(y3[wanted], m3[wanted], device, residual=True, shape=True)
    elif correlated_noise:
        table = _coefficient_table(y3, m3, device, context, covariance_on_residual)
    else:
        table = None
    spread = spreads(correlated_noise, context)
    for done, (todo, references) in enumerate(_wiener_passes(n, wanted, context, passes, spread)):
        filtered = _filter_slices(y3, guide, guide, curve, todo, references, context, device, progress, wiener=True,
                                  table=table, gains_on=g3 if done == 0 else None, spread=spread, shape=noise_shape,
                                  deep_groups=deep_groups, noise_scales=scales)
        for i, a in filtered.items():
            guide[i] = a[0]
        if len(scales) > 1:  # one pass: each weight's slices
            result = np.stack([filtered[i] for i in wanted], axis=1).astype(np.float64)
            return result[:, 0] if np.ndim(noisy) == 2 else result
    result = guide[wanted].astype(np.float64)
    return result[0] if np.ndim(noisy) == 2 else result


def collaborative_hard_threshold(noisy: np.ndarray, pilot: np.ndarray, curve: Curve, context: int = 0,
                                 indices: Optional[Sequence[int]] = None, device: Optional[torch.device] = None,
                                 progress: Optional[Callable[[], None]] = None,
                                 correlated_noise: bool = False, noise_shape: bool = False) -> np.ndarray:
    """BM3D's first step on the slices `indices` (all by default) of `noisy`: an estimate of the image's own.

    Groups are matched on `noisy` itself within HARD_SEARCH_RADIUS voxels, and every coefficient of a group's 3D
    transform below HARD_THRESHOLD noise standard deviations is dropped (weights 1 / (s * coefficients kept)). The
    `pilot` only says at which intensity to read the noise curve, and, with `correlated_noise`, where the
    image is flat enough to read the noise covariance (the threshold is then CORRELATED_HARD_THRESHOLD). With
    `noise_shape` the noise's shape is read first, as the volumetric filter reads it (SHAPE_ROUNDS first steps on
    the COVARIANCE_SLICES middle slices wanted, each read on the last one's residual), and spreads the curve's
    variance over each group's coefficients (`noise_shape_steps` more calls of `progress`); the reads and the
    step after them match each patch's group once (`MatchedGroups`). Shapes, `context`,
    `indices` and `progress` as in `collaborative_wiener`; returns float64.
    """
    y3, m3, wanted = _checked("hard-thresholding filter", noisy, pilot, context, indices)
    if noise_shape and context:
        raise ValueError("the hard-thresholding filter reads the noise's shape only without context slices")
    table = _coefficient_table(y3, m3, device, context, kind=FIRST_STEP_TRANSFORM) if correlated_noise else None
    y32 = np.asarray(y3, dtype=np.float32)
    groups = None
    if noise_shape:
        read, groups = _middle(wanted), MatchedGroups(GROUP)

        def first_step(shape_table: Optional[torch.Tensor]) -> np.ndarray:
            done = _filter_slices(y3, y32, m3, curve, read, read, context, device, progress, wiener=False,
                                  table=shape_table, shape=True, groups=groups)
            return np.stack([done[i][0] for i in read])

        table = _read_noise_shape(y3[read], first_step, device, kind=FIRST_STEP_TRANSFORM)
        groups.keep_new = False  # the other slices' patches are matched once only
    filtered = _filter_slices(y3, y32, m3, curve, wanted, wanted, context, device,
                              progress, wiener=False, table=table, shape=noise_shape, groups=groups)
    result = np.stack([filtered[i][0] for i in wanted]).astype(np.float64)
    return result[0] if np.ndim(noisy) == 2 else result


def volumetric_filter(noisy: np.ndarray, curve: Curve, indices: Optional[Sequence[int]] = None,
                      device: Optional[torch.device] = None, progress: Optional[Callable[[], None]] = None,
                      correlated_noise: bool = False, deep_groups: bool = True) -> np.ndarray:
    """BM4D's two steps on the slices `indices` (all by default) of the volume `noisy` (n, H, W), n >= CUBE: cubes
    hard-thresholded in groups matched on y itself (within CUBE_HARD_SEARCH_RADIUS voxels), then the Wiener filter
    of y guided by that estimate (within CUBE_SEARCH_RADIUS; CORRELATED_CUBE_SEARCH_RADIUS under noise that
    `reads_correlated`; elsewhere, where `deep_groups`, in groups as deep as their similar members allow,
    CUBE_WIENER_GROUP at most, for about 3 times the time of CUBE_GROUP_WIENER's; under white noise each group's
    deviations filtered on the estimate group's own axes: CUBE_WIENER_ON_GROUP_AXES).

    The noise variance of a group is the image's noise curve at its mean intensity (y's in the first step,
    the estimate's in the second, with the curve read again where the estimate is flat: `refined_noise_curve`;
    +0.14 dB on the benchmark's head CT at Gaussian 6/255, whose bone the first reading took as 1.7 times
    noisier), spread over the coefficients of the group's transform as white noise has it in the members' positions
    (`_white_table`), or, where the noise may be `correlated_noise`, as the noise's shape, read on the image, has it
    (SHAPE_ROUNDS says how and what it gained; covariance.py): in the first step, and in the Wiener step unless the
    shape `reads_white`. Cubes of any slice within reach feed the slices
    wanted, so the whole volume should be given even when a few slices are wanted. `progress` is called
    `volumetric_filter_steps(n, indices, correlated_noise)` times (it may raise to stop the filter). Returns
    (len(indices), H, W) in float64; the input is not modified.
    """
    y3, _, wanted = _checked("volumetric filter", noisy, noisy, 0, indices)
    if np.ndim(noisy) != 3 or y3.shape[0] < CUBE:
        raise ValueError(f"the volumetric filter needs a volume of at least {CUBE} slices, got {np.shape(noisy)}")
    y3 = np.asarray(y3, dtype=np.float32)
    wiener_starts, hard_starts, read, read_starts = _volumetric_starts(y3.shape[0], wanted, correlated_noise)
    options = dict(device=device or torch.device("cpu"), progress=progress)
    table = groups = None
    wiener_step = dict(cube=CUBE, weight_of_noise=CUBE_WEIGHT_OF_NOISE, similar=deep_groups)
    threshold = CUBE_HARD_THRESHOLD
    if correlated_noise:
        groups = MatchedGroups(max(CUBE_GROUP_HARD, CUBE_GROUP_HARD_CORRELATED))
        table = _read_noise_shape(y3[read], lambda shape_table: _filter_cubes(
            y3, y3, y3, curve, read_starts, wiener=False, table=shape_table, groups=groups, **options)[read],
            device, cube=CUBE)
        if reads_correlated(table):
            threshold = CORRELATED_CUBE_HARD_THRESHOLD
            wiener_step.update(cube=volumetric_wiener_cube(y3.shape[0]), radius=CORRELATED_CUBE_SEARCH_RADIUS,
                               similar=False)
    # with the shape read the groups are matched again, corrected for the noise near cubes share (`_shared_noise`)
    estimate = _filter_cubes(y3, y3, y3, curve, hard_starts, wiener=False, table=table, threshold=threshold, **options)
    if correlated_noise and not reads_white(table):
        table = _coefficient_table(y3[read], estimate[read], device, residual=True, cube=wiener_step["cube"],
                                   shape=True)
    else:
        table = None  # the Wiener step spreads white noise's variance, also where the shape `reads_white`
    covered = slice(hard_starts[0], hard_starts[-1] + CUBE)  # the slices the first step filtered
    curve = refined_noise_curve(y3[covered], estimate[covered], curve)
    return _filter_cubes(y3, estimate, estimate, curve, wiener_starts, wiener=True, table=table, **wiener_step,
                         **options)[wanted].astype(np.float64)


def volumetric_filter_steps(n: int, indices: Sequence[int], correlated_noise: bool = False) -> int:
    """How many times `volumetric_filter` calls its progress on a volume of n slices (with `correlated_noise`, the
    first steps that read the noise's shape too)."""
    wiener_starts, hard_starts, _, _ = _volumetric_starts(n, sorted(set(indices)), correlated_noise)
    return len(wiener_starts) + len(hard_starts) + (shape_read_steps(n, indices) if correlated_noise else 0)


def shape_read_steps(n: int, indices: Sequence[int]) -> int:
    """How many of `volumetric_filter_steps` with `correlated_noise` read the noise's shape: they come first, and on
    a long volume their number does not grow with it (the shape is read on COVARIANCE_SLICES slices)."""
    return SHAPE_ROUNDS * len(_volumetric_starts(n, sorted(set(indices)), True)[3])


def noise_shape_steps(indices: Sequence[int]) -> int:
    """How many more times `collaborative_hard_threshold` calls its progress with `noise_shape` (without context)."""
    return SHAPE_ROUNDS * len(_middle(sorted(set(indices))))


def _middle(slices: Sequence[int]) -> Sequence[int]:
    """The COVARIANCE_SLICES middle ones of `slices` (a list or a range), which the noise is read on."""
    first = max(0, (len(slices) - COVARIANCE_SLICES) // 2)
    return slices[first:first + COVARIANCE_SLICES]


def _read_noise_shape(y3: np.ndarray, first_step: Callable[[Optional[torch.Tensor]], np.ndarray],
                      device: Optional[torch.device], cube: int = 0, kind: str = "dct") -> torch.Tensor:
    """The coefficient table of the noise's shape on the slices `y3`, read SHAPE_ROUNDS times on y minus
    `first_step(table)` (the first step's estimate of those slices with the last read, white noise's to begin with):
    what an estimate kept of the noise goes missing from its residual, less after each read. The table is of the
    transform `kind`, the first step's."""
    table = None
    for _ in range(SHAPE_ROUNDS):
        table = _coefficient_table(y3, first_step(table), device, residual=True, cube=cube, shape=True, kind=kind)
    return table


def _volumetric_starts(n: int, wanted: Sequence[int], correlated_noise: bool = False):
    """(the Wiener step's cube starts, the first step's, the slices the noise's shape is read on, the first step's
    starts that cover them) for the slices `wanted` of a volume of n slices: the shape is read on the
    COVARIANCE_SLICES middle slices of those the first step covers. The Wiener step's starts are the same for
    every cube side it may take (`volumetric_wiener_cube`), and the first step's cover every slice its largest cube
    may reach (CORRELATED_WIENER_CUBE where the noise may be `correlated_noise`)."""
    wiener_starts, hard_starts = _cube_starts(n, wanted, CORRELATED_WIENER_CUBE if correlated_noise else CUBE)
    read = _middle(range(hard_starts[0], hard_starts[-1] + CUBE))
    return wiener_starts, hard_starts, slice(read.start, read.stop), _cube_starts(n, read)[0]


def _cube_starts(n: int, wanted: Sequence[int], reach_cube: int = CUBE):
    """(the first slices of the Wiener step's reference cubes, those of the hard-thresholding step's): the Wiener
    step's cover the slices wanted with cubes of CUBE slices (a deeper cube from the same start covers them too; one
    that would pass the volume's end is moved back: `_filter_cubes`); the first step's cover every slice the Wiener
    step's candidates reach, its cubes `reach_cube` deep."""
    def covering(lo: int, hi: int) -> List[int]:
        """Every CUBE_SLICE_STEP-th first slice of a cube over slices lo..hi - 1, and the last one."""
        first, last = max(0, lo - CUBE + 1), min(n - CUBE, hi - 1)
        starts = list(range(first, last + 1, CUBE_SLICE_STEP))
        return starts if starts[-1] == last else starts + [last]

    wiener_starts = covering(wanted[0], wanted[-1] + 1)
    reach_lo = max(0, wiener_starts[0] - CUBE_SLICE_REACH)
    reach_hi = min(n, wiener_starts[-1] + CUBE_SLICE_REACH + reach_cube)
    return wiener_starts, covering(reach_lo, reach_hi)


def reads_correlated(table: torch.Tensor) -> bool:
    """Whether the noise shape in the coefficient `table` correlates neighbouring voxels (`neighbour_correlation`)
    by VOLUMETRIC_CORRELATED_NEIGHBOUR_CORRELATION or more: then the volumetric filter thresholds its first estimate
    at CORRELATED_CUBE_HARD_THRESHOLD and its Wiener step takes deeper cubes (`volumetric_wiener_cube`)."""
    neighbour = neighbour_correlation(table)
    return neighbour is not None and neighbour >= VOLUMETRIC_CORRELATED_NEIGHBOUR_CORRELATION


def reads_white(table: torch.Tensor) -> bool:
    """Whether the noise shape in the coefficient `table` correlates neighbouring voxels by less than
    WHITE_NEIGHBOUR_CORRELATION: then the volumetric filter's Wiener step takes white noise's spread."""
    neighbour = neighbour_correlation(table)
    return neighbour is not None and neighbour < WHITE_NEIGHBOUR_CORRELATION


def volumetric_wiener_cube(n: int) -> int:
    """The side of the volumetric filter's Wiener cubes under noise that `reads_correlated`, on a volume of n
    slices: CORRELATED_WIENER_CUBE where the volume is that deep, else CUBE."""
    return CORRELATED_WIENER_CUBE if n >= CORRELATED_WIENER_CUBE else CUBE


@dataclass
class MatchedGroups:
    """The hard-thresholding step's groups, matched on y: its runs that read the noise's shape match the same blocks
    alike (the volumetric filter's cubes, a 2D image's patches; a 2D image's run after them too, where the volumetric
    filter's matches again with the shape read: `_shared_noise`), so each reference row of each slice or cube start
    is matched once, `group` members deep (the deepest group asked for; a shallower one takes its first members, the
    nearest), and kept while `keep_new`."""

    group: int
    keep_new: bool = True
    kept: Dict[Tuple[int, int], torch.Tensor] = field(default_factory=dict)

    def of(self, start: int, rows: torch.Tensor, group: int, match: Callable[[int], torch.Tensor]) -> torch.Tensor:
        """The groups (R, `group`, 3) of the reference blocks in `rows` (each row's in turn) of the slice or cube
        start `start`: those kept, or `match(members)`'s, kept row by row while `keep_new`."""
        keys = [(start, int(row)) for row in rows]
        if all(key in self.kept for key in keys):
            return torch.cat([self.kept[key] for key in keys])[:, :group].long()
        where = match(self.group)
        if self.keep_new:
            self.kept.update(zip(keys, where.to(torch.int32).chunk(len(keys))))
        return where[:, :group]


def _filter_cubes(y3: np.ndarray, match_on: np.ndarray, intensity: np.ndarray, curve: Curve, starts: Sequence[int],
                  wiener: bool, device: torch.device, progress: Optional[Callable[[], None]],
                  table: Optional[torch.Tensor] = None, groups: Optional[MatchedGroups] = None,
                  cube: int = CUBE, threshold: float = CUBE_HARD_THRESHOLD, radius: Optional[int] = None,
                  weight_of_noise: float = 1.0, similar: bool = False) -> np.ndarray:
    """The volume with the voxels that the groups of the reference cubes starting in `starts` cover replaced by
    their collaborative estimate (Wiener gains from `match_on`'s spectra, or hard thresholding of y's); the noise
    variance from `curve` at the group's intensity, spread over each group's coefficients by the noise's shape
    where a coefficient `table` of it is given (`_coefficient_table` with the same `cube`), else as white noise's
    (`_white_table`: cubes that overlap share noise). The cubes are `cube`
    voxels a side; hard thresholding drops coefficients below `threshold` noise std. The hard-thresholding step's
    `groups` (matched on y, so the same in each of its runs) are taken from there where they were kept. The Wiener
    step's groups are CUBE_GROUP_WIENER deep, or, where `similar`, as deep as their similar members allow (up to
    CUBE_WIENER_GROUP: `_similar_group_sizes`); under white noise (no `table` given) the Wiener step filters each
    group on its own axes (`_shrink_on_group_covariance`, CUBE_WIENER_ON_GROUP_AXES)."""
    n, h, w = y3.shape
    starts = [min(start, n - cube) for start in starts]  # a deeper cube than the starts were laid for ends at the end
    # the slices the groups reach
    first, last = max(0, starts[0] - CUBE_SLICE_REACH), min(n, starts[-1] + CUBE_SLICE_REACH + cube)
    total = torch.zeros((last - first) * h * w, dtype=torch.float32, device=device)
    weights = torch.zeros_like(total)
    ref_y = _reference_positions(h, CUBE_STEP, cube).to(device)
    ref_x = _reference_positions(w, CUBE_STEP, cube).to(device)
    steps = torch.arange(cube, device=device)
    inside = ((steps[:, None, None] * h + steps[:, None]) * w + steps).reshape(-1)  # a cube's voxels from its corner
    dct_cube = _transform_on(cube, device, torch.float32, dims=3)
    kaiser = torch.kaiser_window(cube, periodic=False, beta=KAISER_BETA, dtype=torch.float64)
    window = torch.outer(kaiser, kaiser).reshape(-1).repeat(cube).to(device, torch.float32)  # the same in each slice
    group, searched = (CUBE_WIENER_GROUP if similar else CUBE_GROUP_WIENER, CUBE_SEARCH_RADIUS) if wiener else (
        CUBE_GROUP_HARD if table is None else CUBE_GROUP_HARD_CORRELATED, CUBE_HARD_SEARCH_RADIUS)
    radius = radius or searched
    correct_matching = not wiener and table is not None and SHARED_NOISE_CORRECTION
    white = table is None
    table = _white_table(cube, 3, 2 * CUBE_SLICE_REACH, device) if white else table
    rows_at_once = max(1, REFERENCE_CHUNK // len(ref_x))
    done = set()
    for start in starts:
        if start in done:  # a start moved back onto one already filtered
            if progress is not None:
                progress()
            continue
        done.add(start)
        lo, hi = max(0, start - CUBE_SLICE_REACH), min(n, start + CUBE_SLICE_REACH + cube)
        ys, ms, s = (torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(device).reshape(-1)
                     for a in (y3[lo:hi], match_on[lo:hi], np.interp(intensity[lo:hi], *curve)))
        shared = None if not correct_matching else _shared_noise(
            table, start - lo, hi - lo - cube + 1, radius, s.reshape(hi - lo, h, w)[start - lo:start - lo + cube], cube)
        for chunk in torch.split(ref_y, rows_at_once):
            def match(members: int) -> torch.Tensor:
                penalty = None if shared is None else shared(chunk, ref_x)
                return _match(ms.reshape(hi - lo, h, w), start - lo, chunk, ref_x, members, radius, patch=cube,
                              depth=cube, penalty=penalty)

            where = match(group) if groups is None else groups.of(start, chunk, group, match)
            pixels = ((where[..., 0] * h + where[..., 1]) * w + where[..., 2])[..., None] + inside  # (R, group, 64)
            parts = [(where, pixels)]
            if similar:
                within = CUBE_WIENER_SIMILARITY * s[pixels[:, 0]].mean(dim=-1, keepdim=True)
                parts = _split_by_similar(where, pixels, ms, within, group, CUBE_GROUP_WIENER)
            for where, pixels in parts:
                dct1 = _transform_on(where.shape[1], device, torch.float32)
                cy = dct1 @ (ys[pixels] @ dct_cube.T)
                cm = dct1 @ (ms[pixels] @ dct_cube.T) if wiener else None
                on_axes = wiener and white and CUBE_WIENER_ON_GROUP_AXES
                variance = s[pixels].mean(dim=(1, 2))[:, None, None] * group_variance(table, where, on_axes)
                if on_axes:
                    filtered, weight = _shrink_on_group_covariance(cy, cm, variance, dct1, dct_cube, weight_of_noise)
                else:
                    filtered, weight = _shrink(cy, cm, variance, dct1, dct_cube, threshold, weight_of_noise)
                weight = (weight * window).expand_as(filtered)
                targets = (pixels + (lo - first) * h * w).reshape(-1)
                total.index_add_(0, targets, (filtered * weight).reshape(-1))
                weights.index_add_(0, targets, weight.reshape(-1))
        if progress is not None:
            progress()
    result = np.array(match_on, dtype=np.float32)
    covered = (weights > 0).reshape(last - first, h, w).cpu().numpy()
    estimate = (total / weights.clamp_min(1e-30)).reshape(last - first, h, w).cpu().numpy()
    result[first:last][covered] = estimate[covered]
    return result


def _shared_noise(table: torch.Tensor, centre: int, starts: int, radius: int, level: torch.Tensor, cube: int):
    """The noise that cubes near one another share, as block matching on y sees it: two cubes d apart hold noise
    whose squared distance is expected 2 B (R(0) - R(d)) (B voxels; R the noise covariance), less than far cubes'
    2 B R(0) where the noise is correlated, so y's nearest cubes are near ones alike in their noise.
    SHARED_NOISE_CORRECTION times 2 B R(d) is added to each candidate's distance (the gamma of Makinen, Azzari and
    Foi's correction, which BM4D applies). Returns a function of (reference rows, reference columns) giving the (R,
    candidates) penalty, candidates ordered as `_match` orders them (first slice, dy, dx); R(d) is the coefficient
    `table`'s shape (its coefficients at d sum to B R(d)) scaled by the noise variance `level` (cube, H, W) averaged
    over each reference cube, in the reference cube's first slice `centre` of `starts` candidate first slices."""
    depth, middle = table.shape[0] // 2, table.shape[1] // 2
    rows = table.sum(-1)[depth - centre:depth - centre + starts,
                         middle - radius:middle + radius + 1, middle - radius:middle + radius + 1].reshape(1, -1)
    at_reference = F.avg_pool2d(level.mean(0)[None, None], cube, stride=1)[0, 0]  # (H - cube + 1, W - cube + 1)

    def penalty(ref_y: torch.Tensor, ref_x: torch.Tensor) -> torch.Tensor:
        return SHARED_NOISE_CORRECTION * 2 * at_reference[ref_y][:, ref_x].reshape(-1, 1).double() * rows.double()
    return penalty


def _checked(name: str, noisy, pilot, context: int, indices: Optional[Sequence[int]]):
    """(noisy, pilot) as (n, H, W) stacks and the sorted slices wanted, or a ValueError naming the problem."""
    y, m = np.asarray(noisy), np.asarray(pilot)
    if y.shape != m.shape or y.ndim not in (2, 3):
        raise ValueError(f"the {name} needs a noisy image and a pilot of one 2D or 3D shape, got {y.shape} "
                         f"and {m.shape}")
    if min(y.shape[-2:]) < PATCH:
        raise ValueError(f"the {name} needs slices of at least {PATCH} x {PATCH} voxels, got {y.shape}")
    if context < 0:
        raise ValueError(f"the {name} needs a context of 0 or more slices, got {context}")
    y3, m3 = (y[None], m[None]) if y.ndim == 2 else (y, m)
    n = y3.shape[0]
    wanted = sorted(set(range(n) if indices is None else (int(i) for i in indices)))
    if not wanted or wanted[0] < 0 or wanted[-1] >= n:
        raise ValueError(f"the slices to filter must lie within the image's {n} slice(s)")
    return y3, m3, wanted


def _filter_slices(y3: np.ndarray, match_on: np.ndarray, intensity: np.ndarray, curve: Curve, todo: Sequence[int],
                   references: Sequence[int], context: int, device: Optional[torch.device],
                   progress: Optional[Callable[[], None]], gains_on: Optional[np.ndarray] = None, spread: bool = False,
                   groups: Optional[MatchedGroups] = None, **options) -> dict:
    """{slice: filtered slice (one per weight of the noise `_filter_slice_sums` tries, (weights, H, W))} for the
    slices `todo` from the groups of the sorted slices `references`, each
    reference slice's groups drawn from the `context` slices on either side; the Wiener gains come from `gains_on`
    (default `match_on`). With `spread` every group goes back to each slice its members lie in, as BM4D
    aggregates, so the references are those within `context` of the slices in `todo` (`_wiener_passes`);
    otherwise only a reference slice's own patches go back to it, and the references are `todo`. `groups` keeps
    the groups matched under each reference slice's index (`MatchedGroups`). `progress` is called after every
    reference slice."""
    device = device or torch.device("cpu")
    n = y3.shape[0]
    wanted = set(todo)
    sums, filtered = {}, {}  # sums: slice -> [total, weights], while references that reach it remain

    def on_device(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(device)

    for j in references:
        lo, hi = max(0, j - context), min(n, j + context + 1)
        ys, ms, s = (on_device(a) for a in (y3[lo:hi], match_on[lo:hi], np.interp(intensity[lo:hi], *curve)))
        gs = None if gains_on is None else on_device(gains_on[lo:hi])
        total, weights = _filter_slice_sums(ys, ms, s, centre=j - lo, gains_on=gs, every_slice=spread,
                                            groups=groups, start=j, **options)
        first = lo if spread else j  # the slice of the sums' first
        for k in range(first, first + total.shape[1]):
            if k in wanted:
                part = sums.setdefault(k, [0.0, 0.0])
                part[0] = part[0] + total[:, k - first].cpu().numpy()
                part[1] = part[1] + weights[:, k - first].cpu().numpy()
        for k in [k for k in sums if k + (context if spread else 0) <= j or j == references[-1]]:
            total_k, weights_k = sums.pop(k)
            filtered[k] = np.where(weights_k > 0, total_k / np.where(weights_k > 0, weights_k, 1.0), match_on[k])
        if progress is not None:
            progress()
    return filtered


def spreads(correlated_noise: bool, context: int) -> bool:
    """Whether the Wiener step's groups go back to every slice their members lie in: across slices under correlated
    noise (measured above, beside CORRELATED_WIENER_RADIUS_ACROSS_SLICES)."""
    return correlated_noise and context > 0


def slices_read(context: int, correlated_noise: bool) -> int:
    """How many slices either way of a slice its Wiener step reads: the context of its groups, and with `spreads`
    that of the reference slices within `context` of it too (a slice range given these neighbours gets what the
    whole stack gives there)."""
    return context * (2 if spreads(correlated_noise, context) else 1)


def wiener_reference_slices(n: int, indices: Sequence[int], context: int, correlated_noise: bool,
                            passes: int = 1) -> int:
    """How many reference slices (`progress` calls) `collaborative_wiener` filters for the slices `indices` of an
    n-slice stack."""
    return sum(len(references) for _, references in
               _wiener_passes(n, indices, context, passes, spreads(correlated_noise, context)))


def _wiener_passes(n: int, wanted: Sequence[int], context: int, passes: int,
                   spread: bool) -> List[Tuple[List[int], List[int]]]:
    """(slices filtered, reference slices) of each pass of the Wiener step for the slices `wanted` of an n-slice
    stack: a pass filters the slices later passes will look at, and with `spread` its references reach `context`
    slices beyond them."""
    plan = []
    for done in range(passes):
        todo = reference_slices(n, wanted, context * (passes - 1 - done))
        plan.append((todo, reference_slices(n, todo, context if spread else 0)))
    return plan


def reference_slices(n: int, todo: Sequence[int], reach: int) -> List[int]:
    """The slices of an n-slice stack whose reference patches feed the slices `todo` when groups go back to every
    slice within `reach` of their reference slice (0: each slice feeds itself alone)."""
    return sorted({j for i in todo for j in range(max(0, i - reach), min(n, i + reach + 1))})


COVARIANCE_SLICES = 16  # the middle slices of a longer stack that the noise covariance is read on


def _coefficient_table(y3: np.ndarray, m3: np.ndarray, device: Optional[torch.device], context: int = 0,
                       residual: bool = False, cube: int = 0, shape: bool = False, kind: str = "dct") -> torch.Tensor:
    """The covariance of the blocks' coefficients (in the transform `kind`) at every offset two members of a
    correlated-noise group can have, from the noise covariance read where the pilot is flattest (on y - pilot with
    `residual`; covariance.py), on the device: the 2D filters' patches (2 * context slices, CORRELATED_TABLE_REACH
    voxels apart), or with a `cube` side the volumetric filter's cubes (2 * CUBE_SLICE_REACH slices,
    CUBE_TABLE_REACH voxels; the noise covariance read up to cube - 1 slices apart, the cube's depth, and taken as
    uncorrelated farther); with `shape`, per unit of what the noise curve reads under that covariance (the noise's
    shape, which the filters then scale by the curve)."""
    n = y3.shape[0]
    middle = _middle(range(n))
    chosen = slice(middle.start, middle.stop)
    if cube:
        block, dims, depth, slices, reach = cube, 3, cube - 1, 2 * CUBE_SLICE_REACH, CUBE_TABLE_REACH
    else:
        block, dims, depth, slices, reach = PATCH, 2, 2 * context, 2 * context, CORRELATED_TABLE_REACH
    covariance = estimate_noise_covariance(y3[chosen], m3[chosen], depth=min(depth, n - 1), residual=residual,
                                           leave_out_outliers=not shape)
    if shape:
        covariance = noise_shape(covariance)
    return _table_of(covariance, block, dims, slices, reach, device, kind)


# Measured against one variance per group (the members taken as independent), fresh draws on the benchmark volumes'
# test slab and 4 held-out slabs (2026-12-06), the volumetric filter: Gaussian 25/255 +0.10 dB on the InVesalius CT
# and +0.01 on Colin27, Gaussian 6/255 +0.03 and +0.07, Poisson 200 +0.10 and +0.08, Gamma 100 +0.12 and +0.09 (27
# of 40 slabs up by 0.05 or more, none down by more than 0.01); each step alone gained half to two thirds of it.
# Fast on the three 2D images' test crops and 3 held-out regions: Gaussian 25/255 +0.21, +0.23 and +0.20 dB (693 CT,
# shoulder MRI, chest X-ray), Poisson 200 +0.24, -0.03 and +0.14, Gamma 100 +0.35, +0.04 and +0.15, Gaussian 6/255
# +0.09, -0.14 and -0.03 (faint noise where the blind curve also counts the reference's own noise and texture). The
# volumetric filter takes 1.2 times its time (CPU time, one thread), the 2D filters about as long as before:
# `group_variance` counts only the members that overlap. After it, neither the first step's threshold (2.8, 3.2)
# nor the Wiener step's weight of the noise (0.3, 0.55) gained under both Gaussian 25/255 and Gamma 100.
@functools.lru_cache(maxsize=None)
def _white_table(block: int, dims: int, slices: int, device: torch.device, kind: str = "dct") -> torch.Tensor:
    """The coefficient table of white noise of unit variance, the shape the filters take where none is read: two
    members of a group that overlap hold the noise of the voxels they share, so their coefficients' noise correlates
    though the voxels' does not, and `group_variance` counts it (one variance for the whole group took the members
    as independent). Blocks `block` voxels a side in `dims` dimensions (a patch, a cube) in the transform `kind`,
    members up to `slices` slices apart, and the reach of the table `_coefficient_table` reads for them."""
    white = np.zeros((1, 3, 3))
    white[0, 1, 1] = 1.0
    return _table_of(white, block, dims, slices, CUBE_TABLE_REACH if dims == 3 else CORRELATED_TABLE_REACH, device,
                     kind)


def _table_of(covariance: np.ndarray, block: int, dims: int, slices: int, reach: int,
              device: Optional[torch.device], kind: str = "dct") -> torch.Tensor:
    """The coefficient table of the noise covariance R (`coefficient_covariance` of the basis blocks of the
    transform `kind`, `block` voxels a side in `dims` dimensions, up to `slices` slices and `reach` voxels apart),
    float32 on the device."""
    basis = _transform_on(block, torch.device("cpu"), torch.float64, dims, kind).reshape((-1,) + (block,) * dims)
    return coefficient_covariance(covariance, basis, reach, max_slices=slices).to(device or torch.device("cpu"),
                                                                                 torch.float32)


def noise_variance_of(table: torch.Tensor) -> float:
    """The noise variance R(0) a coefficient `table` (`_coefficient_table`, of patches or cubes) was made from: its
    coefficients at one offset d sum to B R(d), B the block's voxels (the transform is orthonormal)."""
    depth, centre = table.shape[0] // 2, table.shape[1] // 2
    return float(table[depth, centre, centre].sum()) / table.shape[-1]


def neighbour_correlation(table: torch.Tensor) -> Optional[float]:
    """How much the noise of neighbouring voxels in a slice correlates, R(1) / R(0) (the mean of the four
    neighbours), read from a coefficient `table` (`_coefficient_table`, of patches or cubes), as
    `noise_variance_of` reads R(0). None where it reads no noise."""
    depth, centre = table.shape[0] // 2, table.shape[1] // 2
    plane = table[depth, centre - 1:centre + 2, centre - 1:centre + 2].sum(-1).double()
    if plane[1, 1] <= 0:
        return None
    return float((plane[1, 0] + plane[1, 2] + plane[0, 1] + plane[2, 1]) / (4 * plane[1, 1]))


def wiener_weight_of_noise(table: torch.Tensor) -> float:
    """The weight of the noise variance s in the 2D correlated-noise filters' Wiener gains where the pilot's
    coefficients stand clear of the noise (`_shrink`), from the coefficient `table` (`_coefficient_table`):
    MILDLY_CORRELATED_WEIGHT_OF_NOISE where neighbouring voxels' noise correlates (`neighbour_correlation`) by
    MILD_NEIGHBOUR_CORRELATION or less, 1 from WIDE_NEIGHBOUR_CORRELATION, linear in between."""
    neighbour = neighbour_correlation(table)
    if neighbour is None:
        return 1.0
    share = (neighbour - MILD_NEIGHBOUR_CORRELATION) / (WIDE_NEIGHBOUR_CORRELATION - MILD_NEIGHBOUR_CORRELATION)
    return MILDLY_CORRELATED_WEIGHT_OF_NOISE + (1.0 - MILDLY_CORRELATED_WEIGHT_OF_NOISE) * min(1.0, max(0.0, share))


def _reference_positions(length: int, step: int = STEP, patch: int = PATCH) -> torch.Tensor:
    """Every `step`-th position of a `patch` along `length` voxels, and the last one, so every voxel is covered."""
    positions = list(range(0, length - patch + 1, step))
    if positions[-1] != length - patch:
        positions.append(length - patch)
    return torch.tensor(positions)


def _match(pilot: torch.Tensor, centre: int, ref_y: torch.Tensor, ref_x: torch.Tensor, group: int = GROUP,
           radius: int = SEARCH_RADIUS, near_shift: int = 0, patch: int = PATCH, depth: int = 1,
           penalty: Optional[torch.Tensor] = None, refs_per_tile: int = MATCH_REFERENCES_PER_TILE) -> torch.Tensor:
    """For each reference block (ref_y x ref_x, row by row) starting in slice `centre`, the (first slice, y, x) of
    the `group` blocks of `pilot` (d, H, W) nearest to it in squared distance within `radius` voxels either way,
    itself first; (R, group, 3). A block is `patch` voxels a side and `depth` slices deep (a patch when 1, a cube
    for the volumetric filter); candidates start in any slice that leaves room for the depth. Patches of the
    centre slice shifted by `near_shift` voxels or less either way (other than the reference itself) are not taken.
    A `penalty` (R, candidates) is added to the distances (`_shared_noise`).

    The squared distance is |a|^2 + |b|^2 - 2 a.b (float64, exact enough for every sum of a block's squares): the
    dot products of each reference row's blocks, `refs_per_tile` at a time, with every candidate block in the rows
    and columns their windows cover are one matrix product on a view of the candidates (no copy), of which each
    reference keeps its own window. Against the distances of one search shift at a time (box sums of squared
    differences) on 128x128 slices: 2.5 to 3.5 times faster at the search radii of 19 and 20 (the 2D first step,
    the 2.5D Wiener step under correlated noise), about as fast at 8, and within 15 % either way on the volumetric
    filter's cubes; on a GPU a slice's matching is a few thousand operations instead of 68,000.
    """
    d, h, w = pilot.shape
    starts = d - depth + 1  # the slices a candidate block can start in
    r, side = radius, 2 * radius + 1
    py, px = h - patch + 1, w - patch + 1  # block positions along each side
    first = int(ref_y[0])
    # every candidate block in the band the references' windows cover, flattened (rows, starts, columns, voxels);
    # block (y, x) of the padded band is the one at (first + y - r, x - r)
    band = F.pad(pilot[:, None].double(), (r, r, r, r))[:, 0, first:int(ref_y[-1]) + 2 * r + patch]
    blocks = band.unfold(1, patch, 1).unfold(2, patch, 1)  # (d, rows, columns, patch, patch)
    if depth > 1:  # a cube: the patches of `depth` consecutive slices
        blocks = torch.cat([blocks[j:j + starts] for j in range(depth)], dim=-2)
    blocks = blocks.permute(1, 0, 2, 3, 4).reshape(blocks.shape[1], starts, blocks.shape[2], -1)
    squares = blocks.pow(2).sum(-1)  # (rows, starts, columns)
    rows_of = ref_y - first
    refs = blocks[rows_of + r, centre][:, ref_x + r]  # (R_y, R_x, voxels)
    # (R_y, R_x, dy, first slice, dx), less the reference's own squares, added once at the end
    dist = torch.empty(len(ref_y), len(ref_x), side, starts, side, dtype=torch.float64, device=pilot.device)
    for a in range(0, len(ref_x), refs_per_tile):
        xs = ref_x[a:a + refs_per_tile]
        lo, hi = int(xs[0]), int(xs[-1]) + side  # the tile's candidate columns
        within = (xs - lo, torch.arange(len(xs), device=pilot.device))  # each reference's window in them
        for i, y in enumerate(rows_of.tolist()):
            dots = blocks[y:y + side, :, lo:hi].flatten(0, 1) @ refs[i, a:a + refs_per_tile].T
            apart = squares[y:y + side, :, lo:hi, None] - 2 * dots.reshape(side, starts, hi - lo, -1)
            dist[i, a:a + refs_per_tile] = apart.unfold(2, side, 1)[:, :, within[0], within[1]].permute(2, 0, 1, 3)
    dist = dist + squares[rows_of + r, centre][:, ref_x + r][..., None, None, None]
    dist = dist.permute(0, 1, 3, 2, 4).reshape(len(ref_y) * len(ref_x), -1)  # (R, candidates (k, dy, dx))
    # candidates whose patch leaves the slice
    shift = torch.arange(-r, r + 1, device=pilot.device)
    ry, rx = ref_y[:, None, None, None] + shift[None, :, None, None], ref_x[None, None, :, None] + shift
    outside = (ry < 0) | (ry >= py) | (rx < 0) | (rx >= px)  # (R_y, side (dy), R_x, side (dx))
    outside = outside.permute(0, 2, 1, 3).reshape(len(ref_y) * len(ref_x), 1, side * side)
    dist = dist.reshape(-1, starts, side * side).masked_fill(outside, float("inf")).reshape(-1, starts * side * side)
    if penalty is not None:
        dist = dist + penalty
    if near_shift:  # the reference's near copies in its own slice are left out
        near = (shift.abs()[:, None] <= near_shift) & (shift.abs()[None, :] <= near_shift)
        dist[:, centre * side * side:(centre + 1) * side * side].masked_fill_(near.reshape(-1), float("inf"))
    # the reference patch itself first: its distance is 0 in the centre slice, which other zeros could tie
    dist[:, (centre * side + r) * side + r] = -1.0
    nearest = torch.topk(dist, min(group, dist.shape[1]), dim=1, largest=False).indices  # (R, group)
    k, rest = nearest // (side * side), nearest % (side * side)
    y = (ref_y[:, None].expand(-1, len(ref_x)).reshape(-1, 1) + rest // side - r).clamp(0, py - 1)
    x = (ref_x[None, :].expand(len(ref_y), -1).reshape(-1, 1) + rest % side - r).clamp(0, px - 1)
    # the clamp guards a window that offers fewer than `group` patches (a small slice, a reference by the border
    # under correlated noise's large groups): border patches repeat, and the exact variances count their noise
    return torch.stack([k, y, x], dim=-1)


def _filter_slice_sums(ys: torch.Tensor, ms: torch.Tensor, s: torch.Tensor, centre: int, wiener: bool = True,
                       table: Optional[torch.Tensor] = None, gains_on: Optional[torch.Tensor] = None,
                       every_slice: bool = False, shape: bool = False, groups: Optional[MatchedGroups] = None,
                       start: int = 0, deep_groups: bool = True,
                       noise_scales: Sequence[float] = (WIENER_2D_NOISE_SCALE,)) -> Tuple[torch.Tensor, torch.Tensor]:
    """The weighted sums of the filtered patches and their weights, from the groups of slice `centre`'s reference
    patches in the stacks (d, H, W) of y, the image the groups are matched on and the noise variance: only the
    centre slice's patches go back, each (1, H, W), or with `every_slice` every member's, each (d, H, W). Wiener
    gains from the coefficients of `gains_on` (default: the matched image, the pilot), or, without `wiener`, hard
    thresholding of y's. Under correlated noise (a coefficient covariance
    `table`, see `_coefficient_table`) each coefficient's noise variance is the exact one of its group
    (covariance.py), with the CORRELATED_ groups, search, spacing and threshold (the Wiener groups, in the slice and
    across slices, only as large as their similar members allow: `_similar_group_sizes`); a `table` of the noise's
    `shape` instead spreads the curve's variance over the coefficients, with the settings of white noise (a lone
    slice's Wiener groups as large as their similar members allow, the WIENER_ settings, up to
    SHALLOW_WIENER_GROUP_2D without `deep_groups`), and without a `table` that shape is white noise's
    (`_white_table`), a lone slice's Wiener step then weighing the noise as each of `noise_scales` says on its groups'
    axes; the sums have a leading axis, one per weight (one elsewhere). The first step thresholds Haar coefficients
    (its `table` must then be read in the Haar transform, as `collaborative_hard_threshold` reads it), and wherever
    a shape spreads the curve's variance each coefficient gets the curve where its basis patch lies (`_spread_over`).
    The groups are taken from `groups` (`MatchedGroups`, under the slice's index `start` in the whole stack) where
    they were kept.

    The reference patches go REFERENCE_CHUNK at a time (whole rows of them), so the working memory stays
    bounded on large slices; patches are read from the slices and written back by index, never all unfolded.
    """
    d, h, w = ys.shape
    device, dtype = ys.device, ys.dtype
    weight_of_noise, similar = 1.0, None  # similar: (limit, smallest group) of `_similar_group_sizes`
    shape_of_noise = table is None or shape  # the curve's variance spread over the coefficients by a shape
    on_group_axes = wiener and table is None and d == 1 and WIENER_2D_ON_GROUP_AXES  # a lone slice's white noise
    if len(noise_scales) > 1 and not on_group_axes:
        raise ValueError("several weights of the noise are tried only by a lone slice's Wiener step under white noise")
    if shape_of_noise:
        group, radius, step, threshold = GROUP, SEARCH_RADIUS if wiener else HARD_SEARCH_RADIUS, STEP, HARD_THRESHOLD
        if wiener and d == 1:
            group = WIENER_GROUP_2D if deep_groups else SHALLOW_WIENER_GROUP_2D
            radius, step = WIENER_RADIUS_2D, WIENER_STEP_2D
            similar = WIENER_SIMILARITY, GROUP  # the limit times the curve's variance at each reference
    else:
        threshold = CORRELATED_HARD_THRESHOLD
        if not wiener:
            group, radius, step = CORRELATED_HARD_GROUP, CORRELATED_HARD_SEARCH_RADIUS, CORRELATED_STEP
        elif d == 1:
            group, radius, step = CORRELATED_WIENER_GROUP, CORRELATED_WIENER_RADIUS_2D, CORRELATED_WIENER_STEP_2D
            weight_of_noise = wiener_weight_of_noise(table)
            similar = (CORRELATED_WIENER_SIMILARITY * noise_variance_of(table),
                       CORRELATED_WIENER_GROUP >> CORRELATED_WIENER_HALVINGS)
        else:
            group, radius, step = (CORRELATED_WIENER_GROUP_ACROSS_SLICES, CORRELATED_WIENER_RADIUS_ACROSS_SLICES,
                                   CORRELATED_STEP)
            similar = (CORRELATED_WIENER_SIMILARITY_ACROSS_SLICES * noise_variance_of(table),
                       CORRELATED_WIENER_SMALLEST_ACROSS_SLICES)
    ref_y, ref_x = _reference_positions(h, step).to(device), _reference_positions(w, step).to(device)
    inside = (torch.arange(PATCH, device=device)[:, None] * w + torch.arange(PATCH, device=device)).reshape(-1)
    # the first step thresholds each patch's FIRST_STEP_TRANSFORM (a `table` read in it), the Wiener step its DCT
    kind = "dct" if wiener else FIRST_STEP_TRANSFORM
    block = _transform_on(PATCH, device, dtype, 2, kind)
    kaiser = torch.kaiser_window(PATCH, periodic=False, beta=KAISER_BETA, dtype=torch.float64)
    window = torch.outer(kaiser, kaiser).reshape(-1).to(device, dtype)
    flat_y, flat_s = ys.reshape(-1), s.reshape(-1)
    flat_g = (ms if gains_on is None else gains_on).reshape(-1)
    kept = d if every_slice else 1
    offset = 0 if every_slice else centre * h * w  # the flat index of the first slice kept
    total = torch.zeros(len(noise_scales), kept * h * w, dtype=dtype, device=device)
    weights = torch.zeros_like(total)
    rows_at_once = max(1, (REFERENCE_CHUNK if table is None else CORRELATED_REFERENCE_CHUNK) // len(ref_x))
    if table is None:  # white noise: the shape of one voxel, whose table counts the noise overlapping members share
        table, shape = _white_table(PATCH, 2, d - 1, device, kind), True
    for chunk in torch.split(ref_y, rows_at_once):
        def match(members: int) -> torch.Tensor:  # (R, members, 3)
            return _match(ms, centre, chunk, ref_x, members, radius, NEAR_COPY_SHIFT if wiener else 0)

        where = match(group) if groups is None else groups.of(start, chunk, group, match)
        pixels = ((where[..., 0] * h + where[..., 1]) * w + where[..., 2])[..., None] + inside  # (R, group, 64)
        parts = [(where, pixels)]
        if similar is not None:  # each group as large as its similar members
            within, smallest = similar
            if shape_of_noise:
                within = within * flat_s[pixels[:, 0]].mean(dim=-1, keepdim=True)
            parts = _split_by_similar(where, pixels, ms.reshape(-1), within, group, smallest)
        for where, pixels in parts:
            dct1 = _transform_on(where.shape[1], device, dtype)
            cy = dct1 @ (flat_y[pixels] @ block.T)  # the group's 3D spectrum
            # each coefficient's own, from the members' positions (on the groups' axes: the mean row's and the rest's)
            variance = group_variance(table, where, mean_and_deviations=on_group_axes)
            if shape:  # the noise curve at the group's intensity, spread over them as the noise's shape has it
                levels = flat_s[pixels].mean(dim=1)  # the curve at each voxel, averaged over the members (R, 64)
                variance = variance * _spread_over(levels[:, None], block)
            cm = dct1 @ (flat_g[pixels] @ block.T) if wiener else None
            if on_group_axes:  # white noise: `shape` holds, and with it the levels
                filtered, weight = _shrink_on_group_covariance(cy, cm, variance, dct1, block, weight_of_noise, levels,
                                                               noise_scales)
            else:
                filtered, weight = (a[None] for a in _shrink(cy, cm, variance, dct1, block, threshold, weight_of_noise))
            weight = weight * window  # (weights, R, 1, 64)
            back = torch.ones_like(where[..., 0], dtype=torch.bool) if every_slice else where[..., 0] == centre
            at = pixels[back].reshape(-1) - offset
            total.index_add_(1, at, (filtered * weight)[:, back].reshape(len(total), -1))
            weights.index_add_(1, at, weight.expand_as(filtered)[:, back].reshape(len(total), -1))
    return total.reshape(-1, kept, h, w), weights.reshape(-1, kept, h, w)


def _similar_group_sizes(pixels: torch.Tensor, match_on: torch.Tensor, within: Union[float, torch.Tensor],
                         group: int, smallest: int) -> torch.Tensor:
    """Each reference's group size (R,): the largest of `group` and its halvings down to `smallest` whose members,
    nearest first (`pixels` (R, group, voxels) of the flat image `match_on` they were matched on), all lie `within`
    a mean squared difference per voxel of the reference's patch, the first member (a number, or one per reference:
    (R, 1))."""
    near = (match_on[pixels] - match_on[pixels[:, :1]]).pow(2).mean(dim=-1)  # (R, group)
    similar = (near <= within).int().cumprod(dim=1).sum(dim=1)  # how many of the nearest all lie within
    size = torch.full_like(similar, smallest)
    while group > smallest:
        size[(similar >= group) & (size < group)] = group
        group >>= 1
    return size


def _split_by_similar(where: torch.Tensor, pixels: torch.Tensor, match_on: torch.Tensor,
                      within: Union[float, torch.Tensor], group: int, smallest: int):
    """The groups (`where` (R, group, 3), `pixels` (R, group, voxels)) cut to their `_similar_group_sizes`, as a list
    of (where, pixels) parts, one per size."""
    size = _similar_group_sizes(pixels, match_on, within, group, smallest)
    return [(where[size == n, :n], pixels[size == n, :n]) for n in size.unique().tolist()]


def _spread_over(levels: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """The noise curve's variance under each coefficient of a group's blocks, (R, 1, K): sum_u B_k(u)^2 s(u),
    averaged over the members, from the curve at each voxel of each member `levels` (R, group, voxels) and the
    blocks' transform `block` (K, voxels). A Haar coefficient covers a few voxels only, so where the noise changes
    across a patch (Poisson or Gamma noise at an edge) the patch's mean misjudges it; a DCT's comes near that mean."""
    return (levels.mean(dim=1) @ (block ** 2).T)[:, None, :]


def _shrink_on_group_covariance(cy: torch.Tensor, cm: torch.Tensor, variance: torch.Tensor, dct1: torch.Tensor,
                                block: torch.Tensor, weight_of_noise: float = 1.0,
                                levels: Optional[torch.Tensor] = None,
                                noise_scale: Union[float, Sequence[float]] = 1.0):
    """As `_shrink`'s Wiener step, but the members' deviations from their group's mean are filtered on the pilot
    group's own axes rather than the blocks' fixed transform (the second step of NL-Bayes, Lebrun, Buades and Morel
    2013): with the pilot's deviations' covariance C as the signal's and the noise's covariance S, each deviation
    becomes C (C + w S)^-1 of itself, w weighing the noise (`noise_scale` times) as `_shrink` does along each axis of
    S^-1/2 C S^-1/2 (its eigenvalue the axis's p^2 / s). A group of similar patches repeats a few shapes, which one
    fixed transform spreads over many coefficients and the group's own axes gather into a few. The group's mean row
    keeps `_shrink`'s gains. S is each coefficient's variance, averaged over the group's DCT rows but its mean
    (`variance` (R, 2, K): the mean row's and that average, as `group_variance`'s `mean_and_deviations` gives); with
    the noise curve at each voxel, `levels` (R, voxels) averaged over the members, it is that variance spread over the
    coefficients as those levels lie (`_spread_over`): Poisson's or Gamma's noise changes across a patch at an edge.
    Only for noise alike in each member (white noise). Several weights (`noise_scale` a sequence) give the filtered
    groups and their weights of each, stacked (weights, R, ...), from one eigendecomposition."""
    group = cy.shape[1]
    noise = variance[:, 0]  # the group's mean row (R, K)
    mean_gain = _wiener_gain(cm[:, 0] ** 2, noise, weight_of_noise)
    mean_gain[:, 0] = 1.0  # the group's mean is kept, as in `_shrink`
    level = variance[:, 1].clamp_min(1e-20)  # (R, K): a deviation's noise in each coefficient

    # rows of coefficients to and from units in which a deviation's noise is white and of variance 1
    if levels is None:
        unit = level.rsqrt()[:, None, :]
        to_white, from_white = (lambda rows: rows * unit), (lambda rows: rows / unit)
    else:  # S = D^1/2 B L B^T D^1/2, L the levels, D the variances over B L B^T's diagonal; whitened in voxels
        # a voxel without noise (Poisson's at 0) would make S singular: each level at least a fiftieth of the patch's
        levels = torch.maximum(levels, LEAST_LEVEL_IN_A_PATCH * levels.mean(dim=-1, keepdim=True)).clamp_min(1e-20)
        unit = (_spread_over(levels[:, None], block)[:, 0].clamp_min(1e-20) / level).sqrt()[:, None, :]  # D^-1/2
        voxel_unit = levels.rsqrt()[:, None, :]  # L^-1/2

        def to_white(rows: torch.Tensor) -> torch.Tensor:
            return (rows * unit) @ block * voxel_unit

        def from_white(rows: torch.Tensor) -> torch.Tensor:
            return (rows / voxel_unit) @ block.T / unit

    deviations = to_white(cm[:, 1:]).double()  # the pilot's deviations (DCT rows but the mean), whitened
    dimensions = deviations.shape[2]
    if group - 1 < dimensions:  # fewer deviations than dimensions: the axes from their Gram matrix, a smaller one
        ratio, among = torch.linalg.eigh(deviations @ deviations.transpose(1, 2) / group)
        ratio = ratio.clamp_min(0.0)
        kept = ratio > 1e-9 * ratio[:, -1:]  # an axis without deviations along it has none
        axes = deviations.transpose(1, 2) @ among * (kept / (group * ratio).clamp_min(1e-30).sqrt())[:, None, :]
    else:
        ratio, axes = torch.linalg.eigh(deviations.transpose(1, 2) @ deviations / group)  # p^2 / s along each axis
        ratio = ratio.clamp_min(0.0)
    axes = axes.to(cy.dtype)  # (R, dimensions, axes), orthonormal columns
    along_axes = to_white(cy[:, 1:]) @ axes
    # the noise left in each of the group's rows but its mean: sum_a gain_a^2 |axis a taken back to coefficients|^2
    left_per_axis = from_white(axes.transpose(1, 2)).pow(2).sum(dim=-1)  # (R, axes)
    each = []
    for scale in np.atleast_1d(noise_scale):
        gain = _wiener_gain(ratio, torch.full_like(ratio, float(scale)), weight_of_noise).to(cy.dtype)[:, None, :]
        rows = from_white((along_axes * gain) @ axes.transpose(1, 2))
        filtered = dct1.T @ torch.cat([(mean_gain * cy[:, 0])[:, None], rows], dim=1) @ block
        left = (group - 1) * (gain[:, 0] ** 2 * left_per_axis).sum(dim=-1) + (mean_gain ** 2 * noise).sum(dim=-1)
        each.append((filtered, (1.0 / (left + 1e-20))[:, None, None]))
    if np.ndim(noise_scale) == 0:
        return each[0]
    return torch.stack([filtered for filtered, _ in each]), torch.stack([weight for _, weight in each])


def _wiener_gain(power: torch.Tensor, variance: torch.Tensor, weight_of_noise: float = 1.0) -> torch.Tensor:
    """The Wiener gain p^2 / (p^2 + w s) of a coefficient whose pilot shows `power` p^2 over noise of `variance` s,
    w = 1 / (1 + (1 / `weight_of_noise` - 1) p^2 / (p^2 + s)): the weight where the pilot's coefficient stands clear
    of the noise, 1 where it lies within it."""
    if weight_of_noise != 1.0:
        power = power * (1.0 + (1.0 / weight_of_noise - 1.0) * power / (power + variance + 1e-20))
    return power / (power + variance + 1e-20)


def _shrink(cy: torch.Tensor, cm: Optional[torch.Tensor], variance: torch.Tensor, dct1: torch.Tensor,
            block: torch.Tensor, threshold: float = HARD_THRESHOLD, weight_of_noise: float = 1.0):
    """The groups' blocks filtered in place and each group's aggregation weight, from the 3D spectra of y's groups
    (R, group, voxels), taken back through the group's DCT `dct1` and the blocks' orthonormal transform `block`:
    Wiener gains from the pilot's spectra `cm` (`_wiener_gain`, the noise weighed by `weight_of_noise` where the
    pilot's coefficient stands clear of it); or, when `cm` is None, hard thresholding at `threshold` noise std."""
    if cm is not None:
        gain = _wiener_gain(cm ** 2, variance, weight_of_noise)
    else:
        gain = (cy.abs() > threshold * variance.sqrt()).to(cy.dtype)
    gain[:, 0, 0] = 1.0  # the group's mean is kept: shrinking it would pull a region's level towards 0
    weight = 1.0 / ((variance * gain.pow(2)).sum(dim=(1, 2), keepdim=True) + 1e-20)  # (R, 1, 1)
    return dct1.T @ (gain * cy) @ block, weight
