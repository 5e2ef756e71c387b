"""Regenerate mipo_local/data/personas.jsonl: the bank of unrelated contexts c' for MIPO negatives.

Each persona combines hand-written parts (who, where, work, tastes, answer wishes) with a fixed seed, so the
bank is diverse, realistic and reproducible. Run: python tools/make_personas.py
"""

import json
import random
from pathlib import Path

PEOPLE = [
    ("Amara", "Lagos, Nigeria", "English"), ("Kenji", "Osaka, Japan", "Japanese"), ("Lucía", "Seville, Spain", "Spanish"),
    ("Mateus", "Porto Alegre, Brazil", "Portuguese"), ("Ingrid", "Bergen, Norway", "Norwegian"),
    ("Farid", "Casablanca, Morocco", "French and Arabic"), ("Priya", "Pune, India", "Marathi and English"),
    ("Tomasz", "Kraków, Poland", "Polish"), ("Chloé", "Lyon, France", "French"), ("Oluwaseun", "Toronto, Canada", "English"),
    ("Mei", "Taipei, Taiwan", "Mandarin"), ("Hannah", "Leipzig, Germany", "German"), ("Diego", "Oaxaca, Mexico", "Spanish"),
    ("Aisha", "Nairobi, Kenya", "Swahili and English"), ("Sven", "Uppsala, Sweden", "Swedish"), ("Ngoc Anh", "Hanoi, Vietnam", "Vietnamese"),
    ("Giulia", "Bologna, Italy", "Italian"), ("Rahel", "Addis Ababa, Ethiopia", "Amharic"), ("Liam", "Galway, Ireland", "English"),
    ("Yusuf", "Izmir, Turkey", "Turkish"), ("Sofía", "Montevideo, Uruguay", "Spanish"), ("Minji", "Busan, South Korea", "Korean"),
    ("Pieter", "Utrecht, the Netherlands", "Dutch"), ("Leilani", "Hilo, Hawaii", "English"), ("Dmitri", "Tbilisi, Georgia", "Russian and Georgian"),
    ("Fatima", "Karachi, Pakistan", "Urdu"), ("Noah", "Melbourne, Australia", "English"), ("Elif", "Ankara, Turkey", "Turkish"),
    ("Joon", "Seoul, South Korea", "Korean"), ("Marta", "Lisbon, Portugal", "Portuguese"), ("Kwame", "Kumasi, Ghana", "Twi and English"),
    ("Anika", "Cape Town, South Africa", "Afrikaans and English"), ("Rafael", "Bogotá, Colombia", "Spanish"),
    ("Hiroko", "Sapporo, Japan", "Japanese"), ("Emeka", "Enugu, Nigeria", "Igbo and English"), ("Saara", "Tampere, Finland", "Finnish"),
    ("Ahmed", "Alexandria, Egypt", "Arabic"), ("Claire", "Quebec City, Canada", "French"), ("Bao", "Ho Chi Minh City, Vietnam", "Vietnamese"),
    ("Ravi", "Chennai, India", "Tamil and English"), ("Zanele", "Durban, South Africa", "Zulu and English"), ("Tariq", "Amman, Jordan", "Arabic"),
    ("Greta", "Graz, Austria", "German"), ("Mariana", "Valparaíso, Chile", "Spanish"), ("Owen", "Cardiff, Wales", "Welsh and English"),
]
AGES = [17, 19, 22, 24, 27, 29, 31, 34, 36, 39, 42, 45, 48, 51, 55, 58, 62, 66, 71, 78]
JOBS = [
    "a high-school physics teacher", "a night-shift nurse", "a freelance graphic designer", "a long-haul truck driver",
    "a first-year law student", "a retired railway engineer", "a pastry chef", "a software developer at a bank",
    "a small-scale organic farmer", "a bus mechanic", "a museum curator", "a primary-school teacher",
    "a startup founder building a delivery app", "a professional violinist", "a stay-at-home parent of three",
    "a pharmacist", "a carpenter", "a PhD student in marine biology", "an accountant", "a firefighter",
    "a hotel receptionist", "a data analyst for a football club", "a translator", "a physiotherapist",
    "a beekeeper", "an electrician", "a journalist covering local politics", "a yoga instructor",
    "a warehouse team lead", "a veterinarian", "an architect", "a retired librarian", "a barista studying at night",
    "a civil servant", "a tattoo artist", "a wedding photographer", "a ship's cook", "a bicycle courier",
]
TASTES = [
    "loves hiking and birdwatching", "collects vinyl jazz records", "is training for a first marathon",
    "plays chess online every evening", "cooks vegetarian food for the whole family", "is learning to play the ukulele",
    "restores old motorbikes", "grows tomatoes and chillies on a balcony", "reads science fiction on the train",
    "follows Formula 1 closely", "knits sweaters for friends", "keeps an aquarium with shrimp",
    "is saving money to travel to Patagonia", "practices calligraphy", "volunteers at a food bank on weekends",
    "plays bass in a punk band", "is obsessed with sourdough bread", "watches old horror films",
    "does bouldering twice a week", "paints watercolour landscapes", "is learning Korean with an app",
    "is renovating an old farmhouse", "coaches a children's football team", "brews kombucha at home",
    "writes short poems in a notebook", "loves board games with friends", "swims in the sea all year round",
    "is a big fan of cricket", "builds small robots with a kid", "dances salsa on Fridays", "has two rescue cats",
    "is trying to eat less sugar", "goes fishing at dawn", "is a devoted fan of K-pop", "plays the organ at church",
]
WISHES = [
    "Answer in three sentences at most.", "Use bullet points, please.", "Explain things like I am a beginner.",
    "Be blunt and skip the pleasantries.", "Give me concrete numbers whenever possible.", "Please answer with a touch of humour.",
    "Always end with one practical next step.", "Use metric units.", "Keep the tone warm and encouraging.",
    "I prefer detailed, technical explanations.", "Avoid jargon.", "Answer with a short example first, then the explanation.",
    "Start with a one-line summary.", "Mention the cost when it matters; my budget is tight.",
    "I have little time: get to the point.", "I like step-by-step instructions with numbered steps.",
    "Please suggest options suited to a small apartment.", "Recommend things I can do without a car.",
    "Give me the pros and cons.", "Use simple English; it is not my first language.",
    "I prefer answers that cite where the facts come from.", "Be patient with me; I am anxious about this topic.",
    "Write in a formal register.", "Talk to me like a friend would.",
]
HEALTH_OR_CONSTRAINTS = [
    "", "", "", "I am lactose intolerant.", "I use a wheelchair.", "I have a bad knee.", "I am colour-blind.",
    "I work irregular hours.", "I live with my elderly mother.", "I am allergic to nuts.", "I do not drink alcohol.",
    "I am on a strict budget this year.", "I have a newborn at home.", "I am dyslexic.", "I keep halal.",
    "I am vegan.", "I am recovering from a back injury.", "I do not own a smartphone, only a laptop.",
]
TEMPLATES = [
    "I am {name}, {age}, {job} living in {place}. I {taste}. {constraint}{wish}",
    "My name is {name} and I am {age}. I work as {job_plain} in {place}, and in my free time I {taste}. I speak {lang}. {constraint}{wish}",
    "{name} here: {age} years old, {job} from {place}. {constraint}I {taste}. {wish}",
    "I'm {age} and live in {place}, where I work as {job_plain}. Outside work I {taste}. {wish} {constraint}",
    "About me: {name}, {job}, {age}, based in {place}; my first language is {lang}. I {taste}. {constraint}{wish}",
]


def main() -> None:
    rng = random.Random(2603_19294)
    seen, personas = set(), []
    while len(personas) < 240:
        name, place, lang = rng.choice(PEOPLE)
        job = rng.choice(JOBS)
        taste = rng.choice(TASTES)
        constraint = rng.choice(HEALTH_OR_CONSTRAINTS)
        key = (name, job, taste)
        if key in seen:
            continue
        seen.add(key)
        text = rng.choice(TEMPLATES).format(
            name=name, age=rng.choice(AGES), job=job, job_plain=job, place=place, lang=lang,
            taste=taste,
            constraint=(constraint + " ") if constraint else "", wish=rng.choice(WISHES),
        )
        text = " ".join(text.replace("I is ", "I am ").replace("I has ", "I have ").replace("I does ", "I do ")
                        .replace("I loves ", "I love ").replace("I collects ", "I collect ").replace("I plays ", "I play ")
                        .replace("I cooks ", "I cook ").replace("I restores ", "I restore ").replace("I grows ", "I grow ")
                        .replace("I reads ", "I read ").replace("I follows ", "I follow ").replace("I knits ", "I knit ")
                        .replace("I keeps ", "I keep ").replace("I practices ", "I practise ").replace("I watches ", "I watch ")
                        .replace("I paints ", "I paint ").replace("I coaches ", "I coach ").replace("I brews ", "I brew ")
                        .replace("I writes ", "I write ").replace("I swims ", "I swim ").replace("I builds ", "I build ")
                        .replace("I dances ", "I dance ").replace("I goes ", "I go ").replace("I volunteers ", "I volunteer ")
                        .split())
        personas.append({"id": f"p{len(personas) + 1:03d}", "text": text})
    out = Path(__file__).resolve().parent.parent / "mipo_local" / "data" / "personas.jsonl"
    out.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in personas), encoding="utf-8")
    print(f"wrote {len(personas)} personas to {out}")


if __name__ == "__main__":
    main()
