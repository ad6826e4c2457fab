"""The world-model experiments: graph worlds and their path datasets (``worlds``), the paper's and Vafa et al.'s
metrics (``evaluate``), and the NTP / MTP / LSE-MTP comparison over seeds (``reproduce``; ``demo`` is one of its
scales). They use the training system (ds_mtp.train, ds_mtp.model) and are never imported by it."""
