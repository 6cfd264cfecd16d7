"""bsbr-retnet: multi-scale retention (Sun et al., 2023) as a bsbr token mixer, an example plugin.

The suite finds it by its entry point (group ``bsbr.architectures``, name ``RetNet``) once the
package is installed, or by import path, ``retnet.mixer:MultiScaleRetention``.
"""

from retnet.mixer import MultiScaleRetention

__all__ = ["MultiScaleRetention"]
