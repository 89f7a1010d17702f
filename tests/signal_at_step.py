"""A test's Lightning callback that sends its own process a signal in the middle of a training
step (between the backward pass and the optimiser's step), at the global step that
LIPVAE_TEST_SIGNAL_AT_STEP names (nothing without it), or when fitting ends (after the margins'
evaluation, before the run's results are written) with LIPVAE_TEST_SIGNAL_AT_FIT_END: stops that no
polling could time."""

import os
import signal

from lightning.pytorch.callbacks import Callback


class SignalAtStep(Callback):
    def __init__(self, signum: int = signal.SIGTERM) -> None:
        self.signum = int(signum)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        at = os.environ.get("LIPVAE_TEST_SIGNAL_AT_STEP")
        if at is not None and trainer.global_step == int(at):
            os.kill(os.getpid(), self.signum)

    def on_fit_end(self, trainer, pl_module) -> None:
        if os.environ.get("LIPVAE_TEST_SIGNAL_AT_FIT_END"):
            os.kill(os.getpid(), self.signum)
