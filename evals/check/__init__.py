"""``bsbr-eval check``: the conformance check of one architecture, built-in or plugin.

- ``conformance``: the properties (causality by perturbation and by Jacobian, the op form,
  streaming, one-token decode, ``generate``, padding, gradients, bf16, device-cleanness, the state
  formula, ``torch.compile``), each a function a user's own tests can call;
- ``command``: the options and ``main``.
"""
