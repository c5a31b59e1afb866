"""Analyses of trained models: `alignment` measures how the SiT/DiT hidden states align with a frozen encoder
(CKNNA, mutual k-NN) and how linearly decodable they are (linear probes), per layer, noise level and step."""
