// MathJax for pymdownx.arithmatex (generic mode): $...$, \(...\) and $$...$$ / \[...\] blocks.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true,
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex",
  },
};
document$.subscribe(() => {
  if (window.MathJax && MathJax.typesetPromise) MathJax.typesetPromise();
});
