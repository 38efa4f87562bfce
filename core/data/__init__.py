"""Training images: the built-in datasets (FashionMNIST, MNIST) as one uint8 tensor."""
