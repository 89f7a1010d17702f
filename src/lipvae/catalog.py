"""The data sets lipvae reads, by the name ``data.name`` takes: torchvision's class of each and
the names of Debian's packages that hold its files. Kept apart from ``lipvae.data`` (which needs
torch and Lightning) so that checking a config, or the bound calculator, imports neither."""

DATASETS = {
    "mnist": {"class": "MNIST", "debian": ("mnist",)},
    "fashion_mnist": {"class": "FashionMNIST", "debian": ("fashion-mnist", "fashion_mnist")},
}
