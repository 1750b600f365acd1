"""matcouple: couple AI models with DFT on a FireWorks/MongoDB LaunchPad."""

__version__ = "0.1.0"
