"""A BERT sentence classifier that pools like the sentence-transformer it starts from.

all-MiniLM-L6-v2 was trained to produce *mean-pooled* sentence embeddings; its
[CLS] position was never trained as a summary. On the ICWSM-2014 data a linear
probe on the mean-pooled embedding beats one on [CLS] by ~8 points, and under DP
a small head on a good representation is what keeps utility: so fedpriv's default
classifier mean-pools. (``pooling = "cls"`` gives the stock
``BertForSequenceClassification`` instead.)

This file is self-contained (torch + transformers only) because ``save_pretrained``
copies it next to the exported weights; ``transformers.pipeline(
"text-classification", model=DIR, trust_remote_code=True)`` then loads the model
without fedpriv installed.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import BertConfig, BertModel, BertPreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput


class MeanPoolingBertForSequenceClassification(BertPreTrainedModel):
    config_class = BertConfig

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config, add_pooling_layer=False)
        self.pre_classifier = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    @staticmethod
    def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Mean over real (non-padding) tokens."""
        if attention_mask is None:
            return hidden.mean(dim=1)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(torch.tanh(self.pre_classifier(pooled))))

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, **kwargs) -> SequenceClassifierOutput:
        outputs = self.bert(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                            position_ids=position_ids, inputs_embeds=inputs_embeds, return_dict=True)
        logits = self.head(self.pool(outputs.last_hidden_state, attention_mask))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)
