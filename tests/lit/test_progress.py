from types import SimpleNamespace

from coalora.lit.progress import StepAwareRichProgressBar


def description(max_epochs):
    bar = StepAwareRichProgressBar()
    bar._trainer = SimpleNamespace(max_epochs=max_epochs)
    return bar._get_train_description(0).strip()


def test_step_limited_runs_show_no_negative_epoch_total():
    assert description(-1) == "Epoch 0"
    assert description(None) == "Epoch 0"
    assert description(3) == "Epoch 0/2"
