"""HTTP front end, in the api server process: OpenAI and SGLang-native routes, the tokenizer
manager that talks to the scheduler process, metrics, and the launcher that starts both."""
