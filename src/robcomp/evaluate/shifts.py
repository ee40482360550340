"""Every shift an evaluation suite may name.

The data layer's shifts (corruptions, domains) transform data alone and live in
:data:`robcomp.data.shifts.SHIFTS`. A shift that needs more than data, a trained model and a
generative model (``manifold-sets``, the fixed on- and off-manifold adversarial test sets of
Kwon & Lee 2021), lives in this layer and registers here: :data:`SHIFTS` extends the data
layer's registry, so a lookup sees both while the data layer's stays as it was.
"""

from __future__ import annotations

from robcomp.data.shifts import SHIFTS as DATA_SHIFTS
from robcomp.data.shifts import ShiftFactory
from robcomp.registry import Registry

SHIFTS: Registry[ShiftFactory] = Registry("shift", extends=DATA_SHIFTS)
