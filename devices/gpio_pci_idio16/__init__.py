"""Emulated ACCES PCI-IDIO-16: 16 isolated inputs, 16 FET outputs, change-of-state interrupt."""

from devices.gpio_pci_idio16.device import Idio16

__all__ = ["Idio16"]
