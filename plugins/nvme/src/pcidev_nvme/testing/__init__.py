"""Host-side tooling for the NVMe controller, not part of the device: a minimal NVMe
driver over the software host (:mod:`pcidev_nvme.testing.driver`) and the I/O
benchmark behind ``pcidev bench nvme`` (:mod:`pcidev_nvme.testing.bench`)."""
