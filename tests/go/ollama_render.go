// Renders an Ollama TEMPLATE on a conversation as Ollama does: Go's text/template, the messages collated
// (consecutive turns of one role merged, every system turn joined into .System), executed with .System
// and .Messages. Reads {"template", "messages"} as JSON on stdin, writes the prompt text to stdout.
// Written for tunelab's tests from Ollama's template/template.go (Template.Execute and collate).
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

func collate(msgs []Message) (string, []*Message) {
	var system []string
	var collated []*Message
	for i := range msgs {
		if msgs[i].Role == "system" {
			system = append(system, msgs[i].Content)
		}
		if len(collated) > 0 && collated[len(collated)-1].Role == msgs[i].Role {
			collated[len(collated)-1].Content += "\n\n" + msgs[i].Content
		} else {
			collated = append(collated, &msgs[i])
		}
	}
	return strings.Join(system, "\n\n"), collated
}

func main() {
	var in struct {
		Template string    `json:"template"`
		Messages []Message `json:"messages"`
	}
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	t, err := template.New("").Option("missingkey=zero").Parse(in.Template)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	system, messages := collate(in.Messages)
	if err := t.Execute(os.Stdout, map[string]any{"System": system, "Messages": messages}); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
