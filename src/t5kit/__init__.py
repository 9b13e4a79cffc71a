"""t5kit: the T5 family (T5, T5 v1.1, Flan-T5, mT5, umT5, ByT5) in PyTorch.

The public surface follows the Hugging Face model pages: configs, the six model classes of each
family, Auto classes, and Hub-compatible ``from_pretrained`` / ``save_pretrained``.
transformers is not needed (nor imported).
"""

from .auto import (
    AutoConfig,
    AutoModel,
    AutoModelForQuestionAnswering,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTextEncoding,
    AutoModelForTokenClassification,
)
from .cache import EncoderDecoderCache
from .config import MT5Config, T5Config, UMT5Config
from .generation import (
    GenerateBeamEncoderDecoderOutput,
    GenerateEncoderDecoderOutput,
    GenerationConfig,
    TextIteratorStreamer,
    TextStreamer,
)
from .modeling import (
    MT5EncoderModel,
    MT5ForConditionalGeneration,
    MT5ForQuestionAnswering,
    MT5ForSequenceClassification,
    MT5ForTokenClassification,
    MT5Model,
    T5EncoderModel,
    T5ForConditionalGeneration,
    T5ForQuestionAnswering,
    T5ForSequenceClassification,
    T5ForTokenClassification,
    T5Model,
    UMT5EncoderModel,
    UMT5ForConditionalGeneration,
    UMT5ForQuestionAnswering,
    UMT5ForSequenceClassification,
    UMT5ForTokenClassification,
    UMT5Model,
)
from .modeling import compile_encoder
from .modeling_utils import PreTrainedModel
from .packing import prepack
from .quantization import quantize_dynamic
from .pipelines import FeatureExtractionPipeline, Text2TextGenerationPipeline, pipeline
from .tokenization import (
    AutoTokenizer,
    BatchEncoding,
    ByT5Tokenizer,
    MT5Tokenizer,
    MT5TokenizerFast,
    T5Tokenizer,
    T5TokenizerFast,
)
from .outputs import (
    BaseModelOutput,
    ModelOutput,
    Seq2SeqLMOutput,
    Seq2SeqModelOutput,
    Seq2SeqQuestionAnsweringModelOutput,
    Seq2SeqSequenceClassifierOutput,
    TokenClassifierOutput,
)

__version__ = "0.1.0"

__all__ = [
    "compile_encoder",
    "prepack",
    "quantize_dynamic",
    "AutoConfig",
    "AutoModel",
    "AutoModelForQuestionAnswering",
    "AutoModelForSeq2SeqLM",
    "AutoModelForSequenceClassification",
    "AutoModelForTextEncoding",
    "AutoModelForTokenClassification",
    "AutoTokenizer",
    "BatchEncoding",
    "ByT5Tokenizer",
    "MT5Tokenizer",
    "MT5TokenizerFast",
    "T5Tokenizer",
    "T5TokenizerFast",
    "BaseModelOutput",
    "EncoderDecoderCache",
    "FeatureExtractionPipeline",
    "Text2TextGenerationPipeline",
    "pipeline",
    "GenerateBeamEncoderDecoderOutput",
    "GenerateEncoderDecoderOutput",
    "GenerationConfig",
    "TextIteratorStreamer",
    "TextStreamer",
    "ModelOutput",
    "MT5Config",
    "MT5EncoderModel",
    "MT5ForConditionalGeneration",
    "MT5ForQuestionAnswering",
    "MT5ForSequenceClassification",
    "MT5ForTokenClassification",
    "MT5Model",
    "PreTrainedModel",
    "Seq2SeqLMOutput",
    "Seq2SeqModelOutput",
    "Seq2SeqQuestionAnsweringModelOutput",
    "Seq2SeqSequenceClassifierOutput",
    "T5Config",
    "T5EncoderModel",
    "T5ForConditionalGeneration",
    "T5ForQuestionAnswering",
    "T5ForSequenceClassification",
    "T5ForTokenClassification",
    "T5Model",
    "TokenClassifierOutput",
    "UMT5Config",
    "UMT5EncoderModel",
    "UMT5ForConditionalGeneration",
    "UMT5ForQuestionAnswering",
    "UMT5ForSequenceClassification",
    "UMT5ForTokenClassification",
    "UMT5Model",
    "__version__",
]
