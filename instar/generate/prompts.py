"""Prompt templates and diversity pools, as data.

Variety comes from sampling one entry from each pool per item with that item's seeded rng (the
TinyStories recipe: a small vocabulary, many topic x style x audience combinations), not from a high
temperature. `TEMPLATE_VERSION` is stored with every record's provenance: change it whenever a template
or pool below changes, so records made by different prompts stay distinguishable.
"""

from __future__ import annotations

TEMPLATE_VERSION = "gen-v3"  # v3: half the instructions are short questions (QUESTION_PAIR, QUESTION_WORDS)

TOPICS = [
    "a lost dog", "the moon", "a rainy day", "baking bread", "a school trip", "a broken bicycle", "the ocean",
    "a new friend", "a garden", "a thunderstorm", "a birthday party", "a library", "trains", "bees and flowers",
    "a snowy morning", "a market", "a kite", "the night sky", "a river", "a small robot", "a farm", "music",
    "a museum", "an old tree", "a camping trip", "the seasons", "cooking soup", "a lighthouse", "a city bus",
    "a lost key", "penguins", "a sports game", "a painting", "a volcano", "recycling", "a hospital visit",
    "a sleepy cat", "a treasure map", "the wind", "a bridge", "saving money", "a science experiment",
    "planting seeds", "a football", "a puppet show", "a picnic", "clouds", "a dragon who is afraid of the dark",
]

STYLES = [
    "a short story with a happy ending", "a short story with a lesson", "a simple explanation of how it works",
    "a diary entry", "a short story with dialogue", "a description of a place", "a short fable with animals",
    "a story told by a child", "a news report for children", "a story with a surprise at the end",
]

AUDIENCES = ["a five-year-old", "a young child", "a beginner reader", "a curious ten-year-old"]

TASK_TYPES = [
    "explain a concept", "summarise a short paragraph", "give a list of ideas", "rewrite a sentence more politely",
    "classify something into a category", "answer a factual question", "write a short Python function",
    "give step-by-step instructions", "compare two things", "give advice", "define a word",
    "translate a simple sentence into plain English", "write a short poem", "correct the grammar of a sentence",
]

MATH_SETTINGS = [
    "buying fruit at a market", "sharing sweets among friends", "saving pocket money", "a bus trip",
    "baking cookies", "a school with several classes", "a farmer with animals", "painting a fence",
    "a library with books", "a football season", "a garden with rows of plants", "a shop discount",
]

MATH_OPERATIONS = ["addition", "subtraction", "multiplication", "division", "two steps: multiply then add",
                   "two steps: add then subtract", "a fraction of a quantity"]

# Two ways of making a preference candidate: a careful persona at a low temperature, a hasty one at a
# high temperature. Differences in process, not in instruction, are what the judge should see.
CAREFUL = ("You are a careful, knowledgeable assistant. Answer the user's request correctly and completely, "
           "in clear simple English.", 0.3)
HASTY = ("You are a hasty assistant who answers in a rush, with little thought and no checking.", 1.0)

SYSTEM_WRITER = "You write short, simple texts in plain English for young readers."
SYSTEM_TEACHER = "You write training data for a helpful AI assistant."
SYSTEM_JUDGE = ("You are a strict, fair judge of answers. You score how helpful, correct and clear each "
                "response is for the user's request.")
SYSTEM_MATH = "You write math word problems for school children and check the arithmetic."
SYSTEM_READER = ("You write questions and answers about documents for training an assistant. An answer uses only "
                 "facts stated in the document, in its own words.")

CORPUS = "Write {style} about {topic} for {audience}. Use short sentences and simple words."
INSTRUCTION_PAIR = ("Invent a request a user might send to an AI assistant about {topic}. The task: {task}. "
                    "Then write the assistant's answer.")
# Short questions answered in prose: asked "invent a request", the teacher writes orders ("Provide a list of
# ideas for..."), almost never a question, and a student whose only questions were math answered "What is the
# capital of Japan?" with a sum. The opening word is drawn so that the questions are not all "What is".
QUESTION_WORDS = ["What", "Why", "How", "Where", "Which", "Who", "When", "Can", "Do", "Is", "Are", "What"]
QUESTION_PAIR = ('Write one short question a curious person might ask an AI assistant about {topic}, starting with '
                 '"{word}". Then write the assistant\'s answer.')
INSTRUCTION_ONLY = "Invent a request a user might send to an AI assistant about {topic}. The task: {task}."
JUDGE = ("Request:\n{instruction}\n\nResponse 1:\n{first}\n\nResponse 2:\n{second}\n\n"
         "Score both responses for this request.")
MATH = ("Write a math word problem about {setting} that uses {operation}, with whole numbers below 100. "
        "Give the arithmetic expression that solves it and its answer.")

# Grounded questions (`instar generate instructions --from PATH`): the question must stand alone, because the
# stored conversation holds the question and answer only, not the passage (the student learns the documents).
QUESTION_KINDS = ["a fact", "a number or a date", "a definition", "a reason (why)", "a process (how)",
                  "a comparison", "a summary of the main point", "a name (who or what)"]
GROUNDED = ('A passage from the document "{name}":\n"""\n{passage}\n"""\n\nWrite one question about {kind} that '
            "this passage answers. The question must make sense to someone who has not seen the passage: name "
            "the subject instead of saying \"the passage\" or \"the text\". Then answer it using only facts "
            "from the passage.")
