"""Killing a training run after a given epoch (the loops' ``on_epoch_end`` hook), to test resume."""


class Killed(Exception):
    pass


def kill_after(n: int):
    """An ``on_epoch_end`` that raises ``Killed`` once epoch ``n`` (1-based) is checkpointed."""
    def kill(epoch, rec):
        if epoch == n:
            raise Killed
    return kill
