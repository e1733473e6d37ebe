"""PML's argument rules for the losses that do not take some inputs (ValueError, as PML)."""


def indices_tuple_not_supported(indices_tuple):
    if indices_tuple is not None:
        raise ValueError("indices_tuple is not supported for this loss function")


def labels_not_supported(labels, ref_labels):
    if labels is not None or ref_labels is not None:
        raise ValueError("labels and ref_labels are not supported for this loss function")
