"""What Sequential and MultiTask share as front ends of one network (fastreg/network.py):
its state, files, export and feature selection. Each front end keeps its own argument shapes
(an array of targets, or a dict by head) and its own summary text (`_summary_text`)."""
from . import pruning, saving


class FrontEnd:
    """The base of Sequential and MultiTask: `_network` is their fastreg.network.Network."""
    _network = None

    @property
    def built(self):
        return self._network.built

    @property
    def dtype(self):
        return self._network.dtype

    def count_params(self):
        """Parameters of every layer, BatchNorm's running statistics included (as Keras)."""
        return self._network.count_params()

    def penalty(self):
        """The current regularization term of the weights, summed over every layer (what
        history["penalty"] tracks, with each training step's activity penalty added)."""
        return self._network.penalty()

    def summary(self):
        """Print the layers, their shapes and parameter counts (as Keras does; a MultiTask's
        heads read the trunk's output); returns the same text."""
        text = self._summary_text()
        print(text)
        return text

    def __repr__(self):
        return self._summary_text()

    # ------------------------------------------------------------ files
    def save_weights(self, path):
        """Write get_weights() alone to `path` (atomically); model.load_weights reads it."""
        saving.save_weights(self, path)

    def load_weights(self, path):
        """set_weights from a file written by save_weights (shapes checked before reading)."""
        saving.load_weights(self, path)

    # ------------------------------------------------------------ export (optional imports)
    def export(self, path, format="onnx", opset=None):
        """Write the ONNX inference graph to `path` (BatchNorm folded, no dropout or noise,
        each loss's sigmoid / softmax on its output; a MultiTask: one output per head, named
        by the head); `pip install "fastreg[onnx]"`."""
        from . import export as _export
        return _export.export(self, path, format=format, opset=opset)

    def to_keras(self):
        """The equivalent Keras 3 model: keras.Sequential, or for a MultiTask a functional
        keras.Model whose outputs are {head: tensor}; same weights and predictions."""
        from . import export as _export
        return _export.to_keras(self)

    def to_torch(self):
        """The equivalent torch module in eval mode: torch.nn.Sequential, or for a MultiTask
        one whose forward returns {head: tensor}; same weights and predictions."""
        from . import export as _export
        return _export.to_torch(self)

    # ------------------------------------------------------------ L1 as feature selection
    def selected_features(self):
        """L1 as feature selection: a FeatureSelection with the input columns whose
        first-layer weights (the trunk's, for a MultiTask) are all exactly zero (dropped)
        and the others (kept); prune(inputs=True) removes the dropped ones."""
        if not self.built:
            raise ValueError("the model has no weights yet: fit it or pass input_dim")
        return pruning.selected_features(self._network)

    @property
    def input_columns(self):
        """After prune(inputs=True): the columns of the original X the model reads (pass
        X[:, model.input_columns]); None when it reads all of them."""
        cols = self._network.input_columns
        return None if cols is None else cols.copy()
