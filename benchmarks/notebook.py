"""The notebook's pipeline, the baseline every benchmark compares gradlab against.

``NotebookTrainer`` re-creates the parts of the notebook's ``ModelTrainer`` (its Trainer.py,
not in the seed; reconstructed from the notebook's cells) that its training-loop cell runs:
``train_model()`` (for each batch of a ``DataLoader(shuffle=True, batch_size=256,
num_workers=0)`` over the per-image PIL transforms: forward, CrossEntropyLoss, zero_grad,
backward, Adam step, ``loss.item()`` appended to a logger), ``evaluate_model(split)`` (under
no_grad, batches of 256, ``(fx.argmax(1) == y).sum().item()`` per batch) and
``save_checkpoint`` (``torch.save`` of model and optimizer state_dicts, epoch, accuracies).
The model is the notebook's Deep_CNN in NCHW float32, as the notebook builds it.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision import transforms

from data_pipeline import NotebookCifar  # a sibling script, not a package
from gradlab.data import MEAN, STD, Splits
from gradlab.models import build_model

BATCH_SIZE = 256  # the notebook's batch_size
LR = 1e-4  # the notebook's learning_rate


def notebook_loader(split: tuple[torch.Tensor, torch.Tensor], shuffle: bool) -> DataLoader:
    """The notebook's DataLoader over ``split``: Resize, ToTensor, Normalize per PIL image."""
    images, labels = (t.cpu() for t in split)
    transform = transforms.Compose([transforms.Resize(32), transforms.ToTensor(),
                                    transforms.Normalize(mean=MEAN, std=STD)])
    dataset = NotebookCifar(images.numpy().transpose(0, 2, 3, 1), labels.tolist(), transform)
    return DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=shuffle, num_workers=0)


class NotebookTrainer:
    """The notebook's ModelTrainer on gradlab's splits (train and validation images as uint8)."""

    def __init__(self, block: str, depth: int, width: int, splits: Splits, device: torch.device,
                 save_dir: Path | None = None, model: torch.nn.Module | None = None) -> None:
        torch.manual_seed(0)
        self.device = device
        self.model = model if model is not None else build_model(block, depth, width).to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=LR)
        self.loss_fun = torch.nn.CrossEntropyLoss()
        self.train_loader = notebook_loader(splits.train, shuffle=True)
        self.valid_loader = notebook_loader(splits.val, shuffle=False)
        self.save_path = None if save_dir is None else save_dir / "Custom_ResNet_2.pt"  # save_dir / model_name
        self.best_valid_acc = 0.0
        self.checkpoints = 0  # epochs whose validation improved (a torch.save)
        self.train_loss_logger: list[float] = []
        self.train_acc_logger: list[float] = []
        self.val_acc_logger: list[float] = []

    @property
    def n_images(self) -> int:
        return len(self.train_loader.dataset)

    def train_model(self, on_step: Callable[[], None] | None = None) -> None:
        self.model.train()
        for x, y in self.train_loader:
            x, y = x.to(self.device), y.to(self.device)
            fx = self.model(x)
            loss = self.loss_fun(fx, y)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            self.train_loss_logger.append(loss.item())  # host sync every step, as in the notebook
            if on_step is not None:
                on_step()

    def evaluate_model(self, train_test_val: str) -> float:
        loader = self.train_loader if train_test_val == "train" else self.valid_loader
        self.model.eval()
        epoch_acc = 0
        with torch.no_grad():
            for x, y in loader:
                fx = self.model(x.to(self.device))
                epoch_acc += (fx.argmax(1) == y.to(self.device)).sum().item()
        acc = epoch_acc / len(loader.dataset)
        (self.train_acc_logger if train_test_val == "train" else self.val_acc_logger).append(acc)
        return acc

    def save_checkpoint(self, epoch: int, valid_acc: float) -> None:
        self.best_valid_acc = valid_acc
        if self.save_path is not None:
            torch.save({"epoch": epoch, "model_state_dict": self.model.state_dict(),
                        "optimizer_state_dict": self.optimizer.state_dict(),
                        "train_acc": self.train_acc_logger[-1], "best_valid_acc": valid_acc}, self.save_path)
        self.checkpoints += 1
