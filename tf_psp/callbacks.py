"""Keras callbacks that report PSP sparsity while training."""

import keras

from tf_psp.profile import profile as profile_model


class PSPMonitor(keras.callbacks.Callback):
    """Adds the model's PSP sparsity and expected MAC reduction to the epoch logs.

    At each epoch end it writes into `logs` (so the values appear in the
    progress bar, in `History.history` and in a `TensorBoard` callback listed
    after this one):

    - `psp_sparsity`: fraction of PSP structures with `|alpha| < epsilon`;
    - `psp_mac_reduction`: `total MACs / (total MACs - pruned MACs)`, the
      expected reduction if the pruned structures are removed (see
      `tf_psp.profile`);
    - `psp_pruned_macs` (with `log_pruned_macs=True`): the pruned MACs;
    - with `removable=True` (costs one `strip_and_shrink` per epoch):
      `psp_removable_mac_reduction`, the MAC reduction `strip_and_shrink`
      actually gives now, and `psp_removable_share`, the fraction of the
      zeroed MACs it removes (the rest stays as zeros: with per-layer alphas,
      a channel one reader prunes and another uses; see
      `tf_psp.profile.Removability`).

    The per-layer MAC counts are computed once when training begins; each
    epoch only the alpha masks are re-read. A model without PSP layers logs
    sparsity 0.0 and reduction 1.0.

    Args:
        verbose: 1 prints a one-line summary per epoch, 0 is silent.
        log_pruned_macs: also log `psp_pruned_macs`.
        input_shape: passed to `tf_psp.profile.profile`; needed only when the
            model's input shape has unknown spatial dimensions.
        removable: also log what `strip_and_shrink` removes (see above).

    Attributes:
        profile: the `tf_psp.profile.ModelProfile` of the last epoch (None
            before training starts).
    """

    def __init__(self, verbose=0, log_pruned_macs=False, input_shape=None, removable=False):
        super().__init__()
        self.verbose = verbose
        self.log_pruned_macs = log_pruned_macs
        self.input_shape = input_shape
        self.removable = bool(removable)
        self.profile = None

    def _profile(self):
        return profile_model(self.model, input_shape=self.input_shape, removable=self.removable)

    def on_train_begin(self, logs=None):
        self.profile = self._profile()

    def on_epoch_end(self, epoch, logs=None):
        if self.profile is None:  # used outside fit(): profile lazily
            self.profile = self._profile()
        values = self.current_values()
        if logs is not None:
            logs.update(values)
        if self.verbose:
            p = self.profile
            print(
                f"Epoch {epoch + 1}: PSP sparsity {p.sparsity:.1%} "
                f"({p.structures_pruned}/{p.structures_total} structures), "
                f"pruned MACs {p.pruned_macs:,}/{p.total_macs:,}, "
                f"expected MAC reduction {p.mac_reduction:.2f}x"
                + (
                    f", removable {p.removability.mac_reduction:.2f}x "
                    f"({p.removability.removable_share:.0%} of zeroed MACs)"
                    if p.removability is not None else ""
                )
            )

    def current_values(self):
        """Re-reads the alpha masks; returns the dict of values logged per epoch."""
        self.profile.refresh()
        values = {
            "psp_sparsity": float(self.profile.sparsity),
            "psp_mac_reduction": float(self.profile.mac_reduction),
        }
        if self.log_pruned_macs:
            values["psp_pruned_macs"] = float(self.profile.pruned_macs)
        r = self.profile.removability
        if r is not None:
            values["psp_removable_mac_reduction"] = float(r.mac_reduction)
            values["psp_removable_share"] = float(r.removable_share)
        return values
