"""Applications over the rest of tunelab: experiments that train arms, evaluate them and report
(`compare`: fine-tuning against instruction-tuning, measured on the same data)."""
