"""``progress.png`` of a pre-training run: nnU-Net's loss, epoch-time and learning-rate panels, one of the loss terms
when there is more than one, and one of the readings when there are any (training solid, validation dotted)."""
import matplotlib

matplotlib.use('agg')
from matplotlib import pyplot as plt  # noqa: E402  (after choosing the backend, as nnU-Net does)

COLORS = ('tab:blue', 'tab:orange', 'tab:green', 'tab:red')


def plot_progress(logged: dict[str, list], terms: tuple[str, ...], readings: tuple[str, ...], readings_label: str,
                  path: str) -> None:
    """Draw what :class:`~nnunet_plugins.pretraining.nnunet_overrides.PretrainingLogger` logged into ``path``."""
    epochs = list(range(min(len(values) for values in logged.values())))
    panels = [('loss (sum of the terms)', ('losses',), ('loss',))]
    if len(terms) > 1:
        panels.append(('loss term', terms, terms))
    if readings:
        panels.append((readings_label, readings, readings))
    plt.rcParams['font.size'] = 30  # nnU-Net's progress.png scales its fonts alike (seaborn, font_scale 2.5)
    fig, axes = plt.subplots(len(panels) + 2, 1, figsize=(30, 18 * (len(panels) + 2)))
    for ax, (ylabel, keys, labels) in zip(axes, panels):
        for key, label, color in zip(keys, labels, COLORS):
            ax.plot(epochs, logged[f'train_{key}'][:len(epochs)], color=color, ls='-', label=f'{label}_tr',
                    linewidth=4)
            ax.plot(epochs, logged[f'val_{key}'][:len(epochs)], color=color, ls='dotted', label=f'{label}_val',
                    linewidth=3)
        ax.set(xlabel='epoch', ylabel=ylabel)
    durations, rates = axes[-2:]
    durations.plot(epochs, [end - start for start, end in zip(logged['epoch_start_timestamps'],
                                                              logged['epoch_end_timestamps'])][:len(epochs)],
                   color='b', ls='-', label='epoch duration', linewidth=4)
    durations.set(xlabel='epoch', ylabel='time [s]', ylim=(0, durations.get_ylim()[1]))
    rates.plot(epochs, logged['lrs'][:len(epochs)], color='b', ls='-', label='learning rate', linewidth=4)
    rates.set(xlabel='epoch', ylabel='learning rate')
    for ax in axes:
        ax.legend(loc=(0, 1))
    plt.tight_layout()
    fig.savefig(path)
    plt.close(fig)
