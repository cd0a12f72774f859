"""The runtime layer: replies made frame by frame over the model (reasoner, frame step,
reply schedule), the streaming conversation, the batched engine, the detokenizer and the
VAD. Imports the model layer only."""
