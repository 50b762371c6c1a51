package mesh

import (
	"flag"
	"io/fs"
	"os"
	"path/filepath"
	"testing"
)

var update = flag.Bool("update", false, "rewrite the generated chart under charts/detour")

// charts/detour is what ChartFiles generates (`make chart` rewrites it). That its `helm
// template` equals `detour install --print`, and that it lints clean, is tested with Helm's own
// packages in integration/chart.
func TestChartIsGenerated(t *testing.T) {
	files, err := ChartFiles()
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join("..", ChartDir)
	if *update {
		if err := os.RemoveAll(dir); err != nil {
			t.Fatal(err)
		}
		for name, b := range files {
			path := filepath.Join(dir, name)
			if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(path, b, 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
	seen := 0
	err = filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		rel, _ := filepath.Rel(dir, path)
		want, ok := files[filepath.ToSlash(rel)]
		if !ok {
			t.Errorf("%s is not generated: remove it, or generate it (make chart)", path)
			return nil
		}
		seen++
		got, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		if string(got) != string(want) {
			t.Errorf("%s is stale: make chart", path)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if seen != len(files) {
		t.Errorf("%d generated file(s) missing under %s: make chart", len(files)-seen, dir)
	}
}
